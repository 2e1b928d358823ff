"""``--result-layout sharded``: results under 256 hash prefixes, read back by every consumer (the
rerun's skip, export, report, recount, eval), and never mixed with mirrored results in one
output. Real ``posebatch`` processes on a folder; the cluster path writes through the same
batch function (``workers.batch``)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from posebatch.keys import image_key_of, result_key, shard
from posebatch.testing.cluster import run_cli
from tests.images import jpeg


def test_sharded_keys_spread_over_256_prefixes_and_invert():
    keys = [f"day/{i:06d}.jpg" for i in range(20_000)]
    shards = Counter(shard(k) for k in keys)
    assert len(shards) == 256 and max(shards.values()) < 2 * 20_000 / 256
    for k in ("a.jpg", "x/é ü.jpg", "deep/a/b/c.png"):
        placed = result_key(k, "sharded")
        assert placed == f"{shard(k)}/{k}.json" and image_key_of(placed, "sharded") == k
        assert image_key_of(result_key(k), "mirror") == k
    assert image_key_of("zz/a.jpg.json", "sharded") is None  # not a.jpg's shard folder
    assert image_key_of("a.jpg.txt", "sharded") is None


def test_a_sharded_run_is_read_back_by_every_consumer_and_never_mixed(tmp_path: Path):
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"sub/{i}.jpg" for i in range(5)]
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(jpeg(64, 48))
    env = {"POSEBATCH_PROVIDERS": "cpu"}
    run_cli("run", str(src), "--out", str(out), "--result-layout", "sharded", "--no-progress",
            env=env)
    for name in names:
        assert (out / result_key(name, "sharded")).is_file(), name
        assert not (out / result_key(name)).exists()
    log_ids = {n: json.loads((out / result_key(n, "sharded")).read_text())["log_id"]
               for n in names}
    again = run_cli("run", str(src), "--out", str(out), "--result-layout", "sharded",
                    "--no-progress", env=env)
    assert "5 images" in again.stdout
    assert log_ids == {n: json.loads((out / result_key(n, "sharded")).read_text())["log_id"]
                       for n in names}  # skipped: found at their sharded place, not redone
    mixed = run_cli("run", str(src), "--out", str(out), "--no-progress", env=env, check=False)
    assert mixed.returncode == 3 and "result_layout" in mixed.stderr, mixed.stderr
    coco = tmp_path / "coco"
    run_cli("export", str(out), "--format", "coco", "--to", str(coco), "--no-images", env=env)
    exported = json.loads((coco / "annotations.json").read_text())
    assert sorted(im["file_name"] for im in exported["images"]) == sorted(names)
    recount = run_cli("recount", str(out), "--valid-box-score", "0.5", env=env)
    assert recount.returncode == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images_seen"] == 5 and summary["settings"]["result_layout"] == "sharded"
    report = tmp_path / "report"
    assert run_cli("report", str(out), "--to", str(report), env=env).returncode == 0
