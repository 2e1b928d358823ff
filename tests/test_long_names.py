"""Names the output cannot hold are one image's problem, never the batch's (issue 21, rows 3, 4).

Table-driven with real files, a real SeaweedFS and a real worker process:

- a local file name of 203-250 bytes (legal: 68 CJK characters are 204 bytes) gets its result:
  the temporary name is ``.pbt-<16 hex>``, not ``.posebatch-tmp-<name>.json.<32 hex>`` (over 255
  bytes on the main before this change: exit 4 "File name too long (transient; try again)");
- a name of 251-255 bytes, whose ``<name>.json`` cannot exist, and an S3 key whose result key is
  over S3's 1024 bytes, get a 282000 error result "no result can be written: ..." (in the job's
  tables: the result file cannot exist), and every other image of the batch its result; exit 0,
  and in the cluster the job finishes at once (on the main every image of the batch was
  recorded 282000 after five attempts, though their results were written).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from posebatch.errors import INTERNAL_ERROR, NAME_TOO_LONG_PREFIX
from posebatch.testing.cluster import WorkerProcess, read_counts_csv, run_cli
from tests.images import jpeg

pytestmark = pytest.mark.timeout(420)


def name_of(size: int, ext: str = ".jpg") -> str:
    """A file name of exactly ``size`` bytes of UTF-8, mostly CJK (3 bytes a character)."""
    body = size - len(ext)
    return "人" * (body // 3) + "a" * (body % 3) + ext


# name bytes -> fits (the result <name>.json is at most 255 bytes)
LOCAL_NAMES = {203: True, 204: True, 240: True, 250: True, 251: False, 255: False}
# S3 key bytes below "in/" -> fits; the output prefix is "out/" (4 bytes), the result adds 5:
# 1015 -> a 1024-byte result key (fits), 1016 -> 1025 (does not). Segments stay below 255
# bytes: SeaweedFS stores each as a file name.
S3_KEYS = {1000: True, 1015: True, 1016: False, 1021: False}


def s3_key_of(size: int) -> str:
    segments, left = [], size - len(".jpg")
    while left > 201:
        segments.append("d" * 200)
        left -= 201
    segments.append("k" * left + ".jpg")
    key = "/".join(segments)
    assert len(key.encode()) == size
    return key


def assert_outcomes(rows: dict[str, dict], expected: dict[str, bool]) -> None:
    for key, fits in expected.items():
        row = rows[key]
        if fits:
            assert row["status"] == "ok", (len(key.encode()), row)
        else:
            assert row["error_code"] == str(INTERNAL_ERROR), (len(key.encode()), row)
            assert row["error_msg"].startswith(NAME_TOO_LONG_PREFIX), row["error_msg"]
    assert rows["plain.jpg"]["status"] == "ok"


def test_a_250_byte_name_has_a_temporary_name_that_fits(tmp_path):
    from posebatch.storage import LocalStorage

    store = LocalStorage(str(tmp_path))
    store.write(name_of(250) + ".json", b"{}")
    assert sorted(os.listdir(tmp_path)) == [name_of(250) + ".json"]  # no temp file left


@pytest.mark.parametrize(("size", "fits"), sorted(LOCAL_NAMES.items()))
def test_local_name_problem(tmp_path, size, fits):
    from posebatch.storage import LocalStorage

    problem = LocalStorage(str(tmp_path / "not yet")).name_problem(name_of(size) + ".json")
    assert (problem is None) == fits, problem
    if not fits:
        assert f"{size + 5} bytes" in problem and "255 bytes per name" in problem


def _local_folder(root: Path) -> dict[str, bool]:
    root.mkdir()
    (root / "plain.jpg").write_bytes(jpeg())
    for size in LOCAL_NAMES:
        (root / name_of(size)).write_bytes(jpeg(64 + size % 7, 48))
    return {name_of(size): fits for size, fits in LOCAL_NAMES.items()}


def test_run_gives_a_name_the_output_cannot_hold_an_error_result(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _local_folder(src)
    for _attempt in range(2):  # the rerun skips the results and records the long ones again
        proc = run_cli("run", str(src), "--out", str(out), "--no-progress", "--imgsz", "256",
                       "--overlays", env={}, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"{len(expected) + 1} images" in proc.stdout, proc.stdout
        rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
        assert_outcomes(rows, expected)
    written = set(os.listdir(out))
    for name, fits in expected.items():
        assert (f"{name}.json" in written) == fits
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def _s3_input(client, bucket: str) -> dict[str, bool]:
    client.put_object(Bucket=bucket, Key="in/plain.jpg", Body=jpeg())
    for size in S3_KEYS:
        client.put_object(Bucket=bucket, Key="in/" + s3_key_of(size), Body=jpeg())
    return {s3_key_of(size): fits for size, fits in S3_KEYS.items()}


def test_s3_run_gives_a_key_the_output_cannot_hold_an_error_result(s3_server, bucket):
    client = s3_server.client()
    expected = _s3_input(client, bucket)
    proc = run_cli("run", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/", "--no-progress",
                   "--imgsz", "256", env=s3_server.env(), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read()
    assert_outcomes({r["key"]: r for r in read_counts_csv(counts)}, expected)
    listed = {o["Key"] for p in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="out/") for o in p.get("Contents", [])}
    for key, fits in expected.items():
        assert (f"out/{key}.json" in listed) == fits


def test_an_output_prefix_too_long_for_the_summary_is_exit_3(s3_server, bucket, tmp_path):
    """Every image refused, then _summary.json cannot be written either: fix --out (exit 3),
    not "transient; try again" (exit 4)."""
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="in/plain.jpg", Body=jpeg())
    out = "/".join(["o" * 200] * 5 + ["o" * 10])  # "out/" is 1016 bytes: nothing fits
    proc = run_cli("run", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/{out}/",
                   "--no-progress", "--imgsz", "256", env=s3_server.env(), check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "1024" in proc.stderr and "shorter --out" in proc.stderr, proc.stderr


# -- the cluster: a worker task ------------------------------------------------------------------

@pytest.fixture(scope="module")
def worker(redis_server, s3_server, tmp_path_factory):
    redis_server.start()
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url,
           "POSEBATCH_IMGSZ": "256"}
    w = WorkerProcess(tmp_path_factory.mktemp("long-names-worker"), env,
                      name=f"long{uuid.uuid4().hex[:6]}")
    w.start()
    yield env, w
    w.stop()


def _submit_and_wait(env: dict[str, str], src: str, out: str) -> None:
    job = run_cli("submit", src, "--out", out, "--batch-images", "16", env=env)
    job_id = job.stdout.strip().splitlines()[-1]
    done = run_cli("wait", job_id, "--timeout", "180", "--no-progress", env=env, check=False)
    assert done.returncode == 1, done.stdout + done.stderr  # some images failed: exit 1


def test_cluster_gives_a_local_name_too_long_an_error_result(worker, tmp_path):
    env, w = worker
    src, out = tmp_path / "in", tmp_path / "out"
    expected = _local_folder(src)
    _submit_and_wait(env, str(src), str(out))
    rows = {r["key"]: r for r in read_counts_csv((out / "_counts.csv").read_bytes())}
    assert_outcomes(rows, expected)
    assert "retry" not in w.log_path.read_text(errors="replace").lower()


def test_cluster_gives_an_s3_key_too_long_an_error_result(worker, s3_server, bucket):
    env, w = worker
    client = s3_server.client()
    expected = _s3_input(client, bucket)
    _submit_and_wait(env, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    counts = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read()
    assert_outcomes({r["key"]: r for r in read_counts_csv(counts)}, expected)
    summary = json.loads(client.get_object(Bucket=bucket, Key="out/_summary.json")["Body"].read())
    assert summary["failed"] == sum(not f for f in expected.values())
