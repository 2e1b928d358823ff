"""CVAT for images 1.1: ``annotations.xml`` with one ``person`` skeleton of 21 points per person.

Why also ``cvat_labels.json``: CVAT imports annotations only into a task whose labels already match,
and a skeleton label is tedious to draw by hand; that file pastes into the label constructor's
"Raw" tab. Keypoints under the threshold keep their coordinates and are marked ``outside``, which
is how CVAT hides a point an annotator can still switch back on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from xml.sax.saxutils import XMLGenerator

from posebatch.exports.base import ImageItem
from posebatch.exports.images import ImagePlacer
from posebatch.exports.skeleton import LIMBS, NAMES, TEMPLATE_XY

FILE_NAME = "annotations.xml"
LABELS_NAME = "cvat_labels.json"
LABEL = "person"


def skeleton_svg() -> str:
    """The skeleton template as CVAT's label constructor stores it (nodes 1-based)."""
    parts = []
    for a, b in LIMBS:
        (x1, y1), (x2, y2) = TEMPLATE_XY[a], TEMPLATE_XY[b]
        parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="black" '
                     f'data-type="edge" data-node-from="{NAMES.index(a) + 1}" '
                     f'data-node-to="{NAMES.index(b) + 1}"></line>')
    for i, name in enumerate(NAMES, 1):
        x, y = TEMPLATE_XY[name]
        parts.append(f'<circle r="1.5" cx="{x}" cy="{y}" data-type="element node" '
                     f'data-element-id="{i}" data-node-id="{i}" '
                     f'data-label-name="{name}"></circle>')
    return "".join(parts)


def cvat_labels() -> list[dict[str, Any]]:
    return [{"name": LABEL, "type": "skeleton", "attributes": [],
             "sublabels": [{"name": n, "type": "points", "attributes": []} for n in NAMES],
             "svg": skeleton_svg()}]


class CvatWriter:
    def __init__(self, dest: Path, placer: ImagePlacer, task_name: str, size: int) -> None:
        self.dest = dest
        self.placer = placer
        self._tmp = dest / (FILE_NAME + ".part")
        self._f = open(self._tmp, "w", encoding="utf-8", buffering=1 << 20)  # noqa: SIM115
        self._xml = XMLGenerator(self._f, "utf-8", short_empty_elements=True)
        self._frame = 0
        self._start(task_name, size)

    def _text(self, tag: str, text: str) -> None:
        self._xml.startElement(tag, {})
        self._xml.characters(text)
        self._xml.endElement(tag)

    def _nl(self, depth: int) -> None:
        self._xml.ignorableWhitespace("\n" + "  " * depth)

    def _start(self, task_name: str, size: int) -> None:
        x = self._xml
        x.startDocument()
        x.startElement("annotations", {})
        self._nl(1)
        self._text("version", "1.1")
        self._nl(1)
        x.startElement("meta", {})
        x.startElement("task", {})
        self._text("name", task_name)
        self._text("size", str(size))
        self._text("mode", "annotation")
        x.startElement("labels", {})
        x.startElement("label", {})
        self._text("name", LABEL)
        self._text("type", "skeleton")
        x.startElement("attributes", {})
        x.endElement("attributes")
        self._text("svg", skeleton_svg())
        x.endElement("label")
        for name in NAMES:
            x.startElement("label", {})
            self._text("name", name)
            self._text("type", "points")
            x.startElement("attributes", {})
            x.endElement("attributes")
            self._text("parent", LABEL)
            x.endElement("label")
        x.endElement("labels")
        x.endElement("task")
        x.endElement("meta")

    def add(self, item: ImageItem) -> None:
        x = self._xml
        self._nl(1)
        x.startElement("image", {"id": str(self._frame), "name": item.key,
                                 "width": str(item.width), "height": str(item.height)})
        self._frame += 1
        for person in item.persons:
            self._nl(2)
            x.startElement("skeleton", {"label": LABEL, "source": "auto", "z_order": "0"})
            for k in person.keypoints:
                self._nl(3)
                x.startElement("points", {
                    "label": k.name, "source": "auto", "outside": "0" if k.visible else "1",
                    "occluded": "0", "points": f"{k.x:.3f},{k.y:.3f}"})
                x.endElement("points")
            self._nl(2)
            x.endElement("skeleton")
        self._nl(1)
        x.endElement("image")
        self.placer.place(item.key, self.dest.joinpath("images", *item.key.split("/")))

    def close(self) -> list[str]:
        self._nl(0)
        self._xml.endElement("annotations")
        self._xml.endDocument()
        self._f.write("\n")
        self._f.close()
        self.placer.close()
        out = self.dest / FILE_NAME
        self._tmp.replace(out)
        labels = self.dest / LABELS_NAME
        labels.write_text(json.dumps(cvat_labels(), indent=2) + "\n", encoding="utf-8")
        return [str(out), str(labels)]
