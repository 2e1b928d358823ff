"""An Ultralytics pose dataset: ``images/``, ``labels/`` and ``data.yaml`` for ``yolo train``.

Why labels are placed by Ultralytics' own rule (the last ``/images/`` of an image's path becomes
``/labels/``, the extension ``.txt``): a key that itself contains an ``images`` folder would
otherwise get a label Ultralytics never finds. Keypoints under the threshold are written ``0 0 0``
(not labelled), so training ignores them instead of learning the model's guesses.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from posebatch.exports.base import ImageItem, Person
from posebatch.exports.images import ImagePlacer
from posebatch.exports.skeleton import NAMES, flip_idx

DATA_YAML = "data.yaml"


def label_path(image_path: str) -> str:
    """Where Ultralytics looks for the label of ``image_path`` (its ``img2label_paths`` rule)."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    return sb.join(image_path.rsplit(sa, 1)).rsplit(".", 1)[0] + ".txt"


def label_line(person: Person, width: int, height: int) -> str:
    """``0 cx cy w h`` + 21 x ``x y v``, normalized to the upright image, 6 decimals."""
    cx = (person.left + person.width / 2) / width
    cy = (person.top + person.height / 2) / height
    vals = [cx, cy, person.width / width, person.height / height]
    for k in person.keypoints:
        vals += [k.x / width, k.y / height] if k.visible else [0.0, 0.0]
        vals.append(2 if k.visible else 0)
    return "0 " + " ".join(f"{v:.6f}" if isinstance(v, float) else str(v) for v in vals)


def in_val(key: str, fraction: float) -> bool:
    """A stable split: the same key lands in the same split on every export."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction


def data_yaml(split: bool, sigmas: list[float] | None) -> str:
    """The dataset file; JSON flow values are valid YAML, so no YAML library is needed."""
    lines = [
        "# Written by posebatch export --format yolo. Train: yolo pose train data=data.yaml",
        "train: images/train" if split else "train: images",
        "val: images/val" if split else "val: images  # no --val-fraction: val = train",
        "kpt_shape: [21, 3]",
        f"flip_idx: {json.dumps(flip_idx())}",
        "names:",
        "  0: person",
        f"kpt_names:\n  0: {json.dumps(list(NAMES))}",
    ]
    if sigmas:
        lines.append(f"kpt_oks_sigmas: {json.dumps(sigmas)}")
    return "\n".join(lines) + "\n"


class YoloWriter:
    def __init__(self, dest: Path, placer: ImagePlacer, val_fraction: float = 0.0,
                 sigmas: list[float] | None = None, overwrite: bool = False) -> None:
        self.dest = dest
        self.mode = "w" if overwrite else "x"
        self.placer = placer
        self.val_fraction = val_fraction
        self.sigmas = sigmas
        self.counts: dict[str, int] = {"train": 0, "val": 0}

    def add(self, item: ImageItem) -> None:
        split = "val" if in_val(item.key, self.val_fraction) else "train"
        self.counts[split] += 1
        rel = [split] if self.val_fraction > 0 else []
        image = self.dest.joinpath("images", *rel, *item.key.split("/"))
        label = Path(label_path(str(image)))
        label.parent.mkdir(parents=True, exist_ok=True)
        lines = [label_line(p, item.width, item.height) for p in item.persons]
        try:
            with open(label, self.mode, encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        except FileExistsError as err:
            raise FileExistsError(
                f"{label} already exists: two images differ only in their extension "
                f"(Ultralytics gives them one label file), or DEST holds an older export; "
                f"export to an empty folder") from err
        self.placer.place(item.key, image)

    def close(self) -> list[str]:
        self.placer.close()
        out = self.dest / DATA_YAML
        out.write_text(data_yaml(self.val_fraction > 0, self.sigmas), encoding="utf-8")
        return [str(out)]

    def summary(self) -> dict[str, Any]:
        return dict(self.counts)
