"""Exports and the report read a job whose images and results live in S3 (a real SeaweedFS).

The run writes its results to the bucket (``posebatch run s3://.../in --out s3://.../out``); the
exports then download images (an S3 input cannot be linked), the Label Studio tasks point at the
bucket, and the report draws its overlays from the bucket's images.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from tests.devdata import require_dev_data
from tests.exporthelpers import posebatch
from tests.images import jpeg

pytestmark = pytest.mark.cluster


@pytest.fixture
def s3_job(bucket: str, s3_server, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    client = s3_server.client()
    images = {f"mhp/{p.name}": p.read_bytes()
              for p in sorted((require_dev_data() / "images" / "mhp").iterdir())}
    images["rot.jpg"] = jpeg(64, 48, orientation=6)
    for key, data in images.items():
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=data)
    client.put_object(Bucket=bucket, Key="in/broken.jpg", Body=b"not an image" * 20)
    posebatch("run", f"s3://{bucket}/in", "--out", f"s3://{bucket}/out", "--no-progress",
              env=dict(os.environ))
    return f"s3://{bucket}/out", images


def test_every_format_and_the_report_work_from_an_s3_output(s3_job, tmp_path):
    out, images = s3_job
    for fmt in ("coco", "yolo", "cvat", "labelstudio"):
        posebatch("export", out, "--format", fmt, "--to", tmp_path / fmt, env=dict(os.environ))
    coco = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    sizes = {img["file_name"]: (img["width"], img["height"]) for img in coco["images"]}
    assert set(sizes) == set(images)  # the broken file failed and is left out
    assert sizes["rot.jpg"] == (48, 64)  # upright, from _counts.csv
    for key, data in images.items():
        for fmt in ("yolo", "cvat"):
            local = tmp_path / fmt / "images" / key
            assert not local.is_symlink() and local.read_bytes() == data  # downloaded
        with Image.open(tmp_path / "yolo" / "images" / key):
            pass
    labels = sorted(p.relative_to(tmp_path / "yolo" / "labels").as_posix()
                    for p in (tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert labels == sorted(k.rsplit(".", 1)[0] + ".txt" for k in images)
    tasks = json.loads((tmp_path / "labelstudio" / "tasks.json").read_text())
    bucket = out.split("/")[2]
    assert sorted(t["data"]["image"] for t in tasks) == sorted(
        f"s3://{bucket}/in/{k}" for k in images)
    assert "<image " in (tmp_path / "cvat" / "annotations.xml").read_text()
    # The report draws its overlays from the bucket's images (one job run serves both checks).
    dest = tmp_path / "report"
    posebatch("report", out, "--to", dest, env=dict(os.environ))
    html = (dest / "index.html").read_text()
    thumbs = sorted((dest / "thumbs").iterdir())
    assert thumbs and len(thumbs) == len(list((dest / "overlays").iterdir()))
    for t in thumbs:
        assert f'src="thumbs/{t.name}"' in html
    assert "216201" in html
