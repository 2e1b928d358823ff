"""A top-down (SimCC) model and ``--quality best`` in the cluster: real redis-server, SeaweedFS
and a worker process started with ``--model``/``--detector`` as a user would; the results must
equal the local run's, and the synthesized graphs (tests/onnx_graphs.py) make them exact."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from posebatch.testing.cluster import (
    WorkerProcess,
    download_results,
    run_cli,
    upload_tree,
    without_log_id,
)
from tests import onnx_graphs as G
from tests.test_topdown import PAD_Y, dots_image, png

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def topdown_stack(redis_server, s3_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("topdown")
    rgb, dots = dots_image()
    boxes = np.array([[200 - 76.8, 100 - 102.4, 200 + 76.8, 100 + 102.4],
                      [450 - 153.6, 300 - 204.8, 450 + 153.6, 300 + 204.8]])
    boxes[:, [1, 3]] += PAD_Y
    cxcywh = np.concatenate([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], 1)
    det = G.yolo_raw(work / "det.onnx", cxcywh, np.array([0.9, 0.8]), np.zeros((2, 17, 3)))
    pose = G.simcc(work / "rtmpose.onnx")
    src = work / "in"
    src.mkdir()
    (src / "dots.png").write_bytes(png(rgb))
    (src / "dots-too.png").write_bytes(png(rgb))
    redis_server.start()
    bucket = s3_server.make_bucket(f"td-{uuid.uuid4().hex[:12]}")
    client = s3_server.client()
    upload_tree(client, bucket, "in/", src)
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url,
           "POSEBATCH_MODEL": str(pose), "POSEBATCH_DETECTOR": str(det)}
    worker = WorkerProcess(work, env, name="topdown")
    worker.start()
    yield {"env": env, "bucket": bucket, "client": client, "src": src, "dots": dots,
           "work": work}
    worker.stop()


@pytest.mark.parametrize("quality", ["fast", "best"])
def test_cluster_top_down_equals_local_and_finds_the_dots(topdown_stack, quality):
    s = topdown_stack
    out = f"out-{quality}/"
    job = run_cli("submit", f"s3://{s['bucket']}/in/", "--out", f"s3://{s['bucket']}/{out}",
                  "--quality", quality, env=s["env"]).stdout.strip().splitlines()[-1]
    proc = run_cli("wait", job, "--timeout", "120", "--no-progress", env=s["env"], check=False)
    assert proc.returncode == 0, proc.stderr
    remote = without_log_id(download_results(s["client"], s["bucket"], out))
    local_out = s["work"] / f"local-{quality}"
    run_cli("run", str(s["src"]), "--out", str(local_out), "--quality", quality,
            "--no-progress", env=s["env"])
    local = without_log_id({p.relative_to(local_out).as_posix(): json.loads(p.read_text())
                            for p in local_out.rglob("*.json")})
    assert remote["dots.png.json"] == local["dots.png.json"]
    result = remote["dots.png.json"]
    found = sorted((p["body_parts"]["nose"]["x"], p["body_parts"]["nose"]["y"])
                   for p in result["person_info"])
    if quality == "fast":
        assert found == sorted(s["dots"])
    else:   # the extra passes may add persons (constant detector), never lose these two
        assert set(s["dots"]) <= set(found)
