"""COCO keypoints: one ``annotations.json`` that pycocotools, ``posebatch eval --gt`` and most
training code read.

Why two spill files: COCO wants all ``images`` then all ``annotations`` in one JSON document.
Writing each list to its own temporary file as results stream past, then joining them, keeps
memory flat for millions of images.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from posebatch.exports.base import ImageItem, Person
from posebatch.exports.skeleton import NAMES, coco_skeleton

FILE_NAME = "annotations.json"
BUF = 1 << 20  # large writes: one result is many small strings


def category() -> dict[str, Any]:
    return {"id": 1, "name": "person", "supercategory": "person", "keypoints": list(NAMES),
            "skeleton": coco_skeleton()}


def annotation(person: Person, ann_id: int, image_id: int) -> dict[str, Any]:
    """A COCO annotation; keypoints under the threshold are v=0 at (0, 0), as COCO spells
    "not labelled", and every score is kept in ``keypoint_scores``."""
    kps: list[float] = []
    for k in person.keypoints:
        kps += [k.x, k.y, 2] if k.visible else [0, 0, 0]
    return {
        "id": ann_id, "image_id": image_id, "category_id": 1, "keypoints": kps,
        "num_keypoints": person.num_visible,
        "bbox": [person.left, person.top, person.width, person.height],
        "area": person.width * person.height, "iscrowd": 0, "score": person.score,
        "keypoint_scores": [k.score for k in person.keypoints],
    }


class CocoWriter:
    def __init__(self, dest: Path, info: dict[str, Any]) -> None:
        self.dest = dest
        self.info = info
        self._images = open(dest / ".images.part", "w", encoding="utf-8", buffering=BUF)  # noqa: SIM115
        self._anns = open(dest / ".annotations.part", "w", encoding="utf-8", buffering=BUF)  # noqa: SIM115
        self._image_id = 0
        self._ann_id = 0

    def add(self, item: ImageItem) -> None:
        self._image_id += 1
        sep = ",\n" if self._image_id > 1 else "\n"
        self._images.write(sep + json.dumps(
            {"id": self._image_id, "file_name": item.key, "width": item.width,
             "height": item.height}, ensure_ascii=False))
        for person in item.persons:
            self._ann_id += 1
            sep = ",\n" if self._ann_id > 1 else "\n"
            self._anns.write(sep + json.dumps(annotation(person, self._ann_id, self._image_id)))

    def close(self) -> list[str]:
        self._images.close()
        self._anns.close()
        out = self.dest / FILE_NAME
        tmp = self.dest / (FILE_NAME + ".part")
        head = {"info": self.info, "licenses": [], "categories": [category()]}
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(head, ensure_ascii=False)[:-1])
            for name, part in (("images", self._images.name), ("annotations", self._anns.name)):
                f.write(f', "{name}": [')
                with open(part, encoding="utf-8") as src:
                    shutil.copyfileobj(src, f)
                f.write("\n]")
                os.unlink(part)
            f.write("}\n")
        os.replace(tmp, out)
        return [str(out)]
