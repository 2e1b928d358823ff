"""Run by the model-build environment's Python (which has Ultralytics): check a YOLO pose export
with Ultralytics' own code and print what it read, as JSON, for tests/test_exports.py.

Usage: python tests/yolo_verify.py DEST/data.yaml
Not imported by the tests: this file must not import posebatch (it is not installed there).
"""

import glob
import json
import os
import sys

from ultralytics.data.utils import (
    IMG_FORMATS,
    check_det_dataset,
    img2label_paths,
    verify_image_label,
)

data = check_det_dataset(sys.argv[1], autodownload=False)
nkpt, ndim = data["kpt_shape"]
if data.get("flip_idx") is not None:
    assert len(data["flip_idx"]) == nkpt, "flip_idx length must equal kpt_shape[0]"
report = {"nc": data["nc"], "names": data["names"], "kpt_shape": data["kpt_shape"],
          "flip_idx": data.get("flip_idx"), "splits": {}}
for split in ("train", "val"):
    root = data[split]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.*"), recursive=True)
                   if f.rpartition(".")[-1].lower() in IMG_FORMATS)
    rows = []
    for im_file, lb_file in zip(files, img2label_paths(files), strict=True):
        out = verify_image_label((im_file, lb_file, "", True, data["nc"], nkpt, ndim, False))
        im, lb, shape, _segments, kpts, nm, nf, ne, nc, msg = out
        rows.append({"image": os.path.relpath(im_file, root), "label": lb_file,
                     "shape": list(shape) if shape is not None else None,
                     "boxes": lb.tolist() if lb is not None else None,
                     "keypoints": kpts.tolist() if kpts is not None else None,
                     "missing": nm, "found": nf, "empty": ne, "corrupt": nc, "msg": msg})
    report["splits"][split] = rows
print(json.dumps(report))
