"""Label Studio: ``tasks.json`` with one prediction per image, and ``labeling_config.xml``.

Why predictions and not annotations: Label Studio shows predictions as pre-annotations an annotator
accepts or fixes, which is what machine pre-labelling is for. Each person is a ``rectanglelabels``
region; its keypoints are ``keypointlabels`` regions whose ``parentID`` names the box, the link
Label Studio's own converter uses to build COCO and YOLO pose rows. Coordinates are percent of the
upright image, as Label Studio stores them. Keypoints under the threshold are left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from posebatch.exports.base import ImageItem, Person
from posebatch.exports.skeleton import NAMES, side

TASKS_NAME = "tasks.json"
CONFIG_NAME = "labeling_config.xml"
SIDE_COLOURS = {"left": "#e53935", "right": "#1e88e5", "center": "#43a047"}


def labeling_config() -> str:
    labels = "\n".join(
        f'    <Label value="{n}" model_index="{i}" background="{SIDE_COLOURS[side(n)]}"/>'
        for i, n in enumerate(NAMES))
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true" zoomControl="true"/>\n'
        '  <RectangleLabels name="person" toName="image">\n'
        '    <Label value="person" background="#ffb300"/>\n'
        "  </RectangleLabels>\n"
        '  <KeyPointLabels name="keypoints" toName="image" smart="false">\n'
        f"{labels}\n"
        "  </KeyPointLabels>\n"
        "</View>\n"
    )


def person_regions(person: Person, index: int, width: int, height: int) -> list[dict[str, Any]]:
    box_id = f"p{index}"
    common = {"to_name": "image", "original_width": width, "original_height": height,
              "image_rotation": 0}
    regions = [{
        "id": box_id, "from_name": "person", "type": "rectanglelabels", **common,
        "score": person.score,
        "value": {"x": 100.0 * person.left / width, "y": 100.0 * person.top / height,
                  "width": 100.0 * person.width / width, "height": 100.0 * person.height / height,
                  "rotation": 0, "rectanglelabels": ["person"]},
    }]
    for j, k in enumerate(person.keypoints):
        if not k.visible:
            continue
        regions.append({
            "id": f"{box_id}k{j}", "parentID": box_id, "from_name": "keypoints",
            "type": "keypointlabels", **common, "score": k.score,
            "value": {"x": 100.0 * k.x / width, "y": 100.0 * k.y / height,
                      "keypointlabels": [k.name]},
        })
    return regions


class LabelStudioWriter:
    def __init__(self, dest: Path, image_url: str, model_version: str) -> None:
        """``image_url``: prefix the image key is appended to, e.g. ``/data/local-files/?d=``."""
        self.dest = dest
        self.image_url = image_url
        self.model_version = model_version
        self._tmp = dest / (TASKS_NAME + ".part")
        self._f = open(self._tmp, "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        self._f.write("[")
        self._n = 0

    def add(self, item: ImageItem) -> None:
        result: list[dict[str, Any]] = []
        for i, person in enumerate(item.persons):
            result += person_regions(person, i, item.width, item.height)
        scores = [p.score for p in item.persons]
        task = {
            "data": {"image": self.image_url + item.key, "posebatch_key": item.key},
            "predictions": [{"model_version": self.model_version,
                             "score": min(scores) if scores else 0.0, "result": result}],
        }
        self._f.write((",\n" if self._n else "\n") + json.dumps(task, ensure_ascii=False))
        self._n += 1

    def close(self) -> list[str]:
        self._f.write("\n]\n")
        self._f.close()
        out = self.dest / TASKS_NAME
        self._tmp.replace(out)
        config = self.dest / CONFIG_NAME
        config.write_text(labeling_config(), encoding="utf-8")
        return [str(out), str(config)]
