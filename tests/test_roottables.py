"""Root tables as an index over per-job tables (issue 22, item 4): a job end writes its own table
and ``_tables.json`` without reading earlier rows; the merged view (base + pending, newest wins)
and the compacted tables equal those of one job over the same images; compaction follows the
policy; every consumer reads the merged view; an older output (no index) still reads.
Real SeaweedFS, real redis-server, real output folders."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from posebatch.aggregate import COUNTS_NAME, RUN_FIELDS, counts_csv, summarize, summary_json
from posebatch.finalize import finalize
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobStore
from posebatch.manifest import MANIFEST_NAME, manifest
from posebatch.records import Record
from posebatch.roottables import (
    INDEX_NAME,
    carried,
    compact,
    current_rows,
    has_tables,
    read_index,
)
from posebatch.s3storage import S3Storage
from posebatch.schema import PoseResult, encode_result
from posebatch.settings import JobSettings
from posebatch.storage import open_storage
from tests.exporthelpers import posebatch
from tests.images import jpeg

POOL = [f"d{i % 3}/img {i:03d}, ü.jpg" for i in range(60)]


def job_records(n: int, rng: random.Random) -> list[Record]:
    """A job over an overlapping subset of POOL: some failed, some skipped (no size, no etag)."""
    recs = []
    for key in rng.sample(POOL, 25):
        kind = rng.randrange(6)
        if kind == 0:
            recs.append(Record(key, False, 216201, 0, 0, f"not an image (job {n})"))
        elif kind == 1:  # skipped: its result existed, so no size and no listing version
            recs.append(Record(key, True, None, n % 4, n % 3))
        else:
            recs.append(Record(key, True, None, n % 5, n % 2, width=100 + n, height=50 + n,
                               etag=f"e{n}", nbytes=1000 + n))
    return recs


def one_job_over(jobs: list[list[Record]]) -> list[Record]:
    """The rows one job over the same images gives: newest record wins, carrying sizes."""
    rows: dict[str, Record] = {}
    for recs in jobs:
        for r in recs:
            rows[r.key] = carried(r, rows[r.key]) if r.key in rows else r
    return [rows[k] for k in sorted(rows)]


def without_run_fields(summary: dict) -> dict:
    return {k: v for k, v in summary.items()
            if k not in (*RUN_FIELDS, "earlier_results", "pending", "counts_cover")}


def end_jobs(dst, jobs: list[list[Record]], first: int = 1) -> None:
    for n, recs in enumerate(jobs, first):
        finalize(dst, iter(recs), {"job_id": f"j{n}"}, "", merge_root=True)


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_n_jobs_read_and_compact_to_the_rows_of_one_job(where, tmp_path, bucket, monkeypatch):
    rng = random.Random(7)
    jobs = [job_records(n, rng) for n in range(1, 7)]
    expected = one_job_over(jobs)
    url = f"s3://{bucket}/out/" if where == "s3" else str(tmp_path / "out")
    dst = open_storage(url)
    monkeypatch.setattr("posebatch.roottables.COMPACT_RATIO", 0)  # never by size
    end_jobs(dst, jobs)
    first_base = dst.read(COUNTS_NAME)
    assert first_base == counts_csv(jobs[0])  # the first job made the base; no other touched it
    index = read_index(dst)
    assert [p.job_id for p in index.pending] == [f"j{n}" for n in range(2, 7)]
    assert [p.rows for p in index.pending] == [25] * 5
    with current_rows(dst) as rows:
        assert list(rows) == expected
    summary = json.loads(dst.read("_summary.json"))
    assert summary["images_seen"] == 25 and len(summary["pending"]) == 5  # the base's counts

    compacted = compact(dst)
    assert dst.read(COUNTS_NAME) == counts_csv(expected)
    assert without_run_fields(compacted) == without_run_fields(summarize(expected, {}))
    assert compacted["job_id"] == "j6"
    assert read_index(dst).pending == () and read_index(dst).base_rows == len(expected)

    # The same jobs compacted at every job end (the old merging finalize's cadence) agree.
    monkeypatch.setattr("posebatch.roottables.COMPACT_RATIO", 10**9)
    every = open_storage(url.rstrip("/") + "-every")
    end_jobs(every, jobs)
    assert read_index(every).pending == ()
    assert every.read(COUNTS_NAME) == counts_csv(expected)
    assert without_run_fields(json.loads(every.read("_summary.json"))) == \
        without_run_fields(compacted)


def test_a_job_end_reads_no_earlier_row(bucket, monkeypatch):
    out = S3Storage(bucket, "out")
    base = [Record(f"old/{i:06d}.jpg", True, None, 1, 1, width=64, height=48)
            for i in range(20_000)]
    finalize(out, iter(base), {"job_id": "j1"}, "", merge_root=True)
    assert read_index(out).base_rows == 20_000
    fetched: list[tuple[str, int]] = []
    real_read, real_download = S3Storage.read, S3Storage.download

    def counted_read(self, key, max_bytes=None):
        data = real_read(self, key, max_bytes)
        fetched.append((key, len(data)))
        return data

    def counted_download(self, key, path):
        real_download(self, key, path)
        fetched.append((key, Path(path).stat().st_size))

    monkeypatch.setattr(S3Storage, "read", counted_read)
    monkeypatch.setattr(S3Storage, "download", counted_download)
    mine = [Record(f"new/{i}.jpg", True, None, 2, 2, width=8, height=8) for i in range(100)]
    finalize(out, iter(mine), {"job_id": "j2"}, "", merge_root=True)
    keys = {k for k, _ in fetched}
    assert COUNTS_NAME not in keys  # the base (20,000 rows, ~800 KB) is not read
    assert keys <= {INDEX_NAME, "_summary.json"}
    assert sum(n for _, n in fetched) < 8_000
    monkeypatch.setattr(S3Storage, "read", real_read)
    monkeypatch.setattr(S3Storage, "download", real_download)
    with current_rows(out) as rows:
        keys_now = [r.key for r in rows]
    assert len(keys_now) == 20_100 and keys_now == sorted(keys_now)


def test_compaction_follows_the_policy(tmp_path, monkeypatch):
    dst = open_storage(str(tmp_path / "out"))

    def job(n: int, size: int) -> None:
        recs = [Record(f"j{n}/{i:03d}.jpg", True, None, 1, 1) for i in range(size)]
        finalize(dst, iter(recs), {"job_id": f"j{n}"}, "", merge_root=True)

    job(1, 80)  # no base yet: the first job is the base
    assert read_index(dst).base_rows == 80 and read_index(dst).pending == ()
    job(2, 5)  # 5 pending rows < 80 / 8
    assert [p.job_id for p in read_index(dst).pending] == ["j2"]
    assert dst.read(COUNTS_NAME).count(b"\r\n") == 81  # header + the base's rows, untouched
    job(3, 5)  # 10 pending rows >= 80 / 8: compacted
    assert read_index(dst).pending == () and read_index(dst).base_rows == 90
    assert dst.read(COUNTS_NAME).count(b"\r\n") == 91
    monkeypatch.setattr("posebatch.roottables.MAX_PENDING", 2)
    job(4, 1)
    job(5, 1)
    assert len(read_index(dst).pending) == 2
    job(6, 1)  # a third pending table: more than MAX_PENDING
    assert read_index(dst).pending == () and read_index(dst).base_rows == 93
    job(7, 0)  # a rerun that found nothing new changes nothing at the root
    assert read_index(dst).pending == ()


def test_an_output_written_before_the_index_reads_as_a_base(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    old = [Record(f"k{i}.jpg", True, None, 1, 1, width=10, height=10) for i in range(40)]
    (out / COUNTS_NAME).write_bytes(counts_csv(old))  # what the merging finalize wrote
    (out / "_summary.json").write_bytes(summary_json(summarize(old, {"job_id": "old"})))
    dst = open_storage(str(out))
    assert has_tables(dst) and read_index(dst).pending == ()
    with current_rows(dst) as rows:
        assert list(rows) == sorted(old, key=lambda r: r.key)
    # A skipped image (no size) replacing an old row keeps the old row's size when read.
    finalize(dst, iter([Record("k3.jpg", True, None, 5, 5), Record("zz.jpg", True, None, 1, 0)]),
             {"job_id": "new"}, "", merge_root=True)
    index = read_index(dst)
    assert index.base_rows == 40 and [p.job_id for p in index.pending] == ["new"]
    with current_rows(dst) as rows:
        got = {r.key: r for r in rows}
    assert len(got) == 41
    assert (got["k3.jpg"].person_num, got["k3.jpg"].width) == (5, 10)


def test_job_ends_into_one_output_wait_for_its_lock_and_lose_no_table(redis_server, tmp_path):
    redis_server.start()
    store = JobStore(redis_server.client())
    store.r.flushall()
    out = tmp_path / "out"
    url = open_storage(str(out)).url

    def submitted(job_id: str, n: int) -> None:
        store.create(job_id, {"input": None, "output": str(out), "settings": {}})
        store.mark_submitted(job_id, n, 1)
        store.add_records(job_id, [Record(f"{job_id}/{i}.jpg", True, None, 1, 1, width=4,
                                          height=4) for i in range(n)])

    submitted("j0", 400)
    assert maybe_finalize(store, "j0")  # the base
    for j in range(1, 5):
        submitted(f"j{j}", 3)
    with store.output_lock(url):  # a compaction holds the output: job ends wait
        done: list[bool] = []
        threads = [threading.Thread(target=lambda j=j: done.append(maybe_finalize(store, f"j{j}")))
                   for j in range(1, 5)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        assert done == [] and read_index(open_storage(str(out))).pending == ()
    for t in threads:
        t.join(30)
    assert done == [True] * 4
    index = read_index(open_storage(str(out)))
    assert sorted(p.job_id for p in index.pending) == ["j1", "j2", "j3", "j4"]  # none lost
    assert all(store.progress(f"j{j}").state == "done" for j in range(5))


def test_posebatch_compact_takes_the_lock_and_writes_exact_tables(redis_server, tmp_path,
                                                                  monkeypatch):
    redis_server.start()
    dst = open_storage(str(tmp_path / "out"))
    end_jobs(dst, [[Record(f"a{i}.jpg", True, None, 1, 1) for i in range(100)]])
    end_jobs(dst, [[Record("a1.jpg", True, None, 3, 3), Record("b.jpg", False, 216201, 0, 0,
                                                               "not an image")]], first=2)
    assert len(read_index(dst).pending) == 1
    proc = posebatch("compact", str(tmp_path / "out"), "--broker", redis_server.url)
    assert "compacted 1 pending tables: 101 images, 100 ok, 1 failed" in proc.stdout
    s = json.loads(dst.read("_summary.json"))
    assert (s["images_seen"], s["persons_total"], s["job_id"]) == (101, 99 + 3, "j2")
    assert "pending" not in s and read_index(dst).pending == ()


def api_result(persons: int) -> dict:
    rng = np.random.default_rng(persons)
    kpts = np.concatenate([rng.uniform(1, 30, (persons, 21, 2)),
                           rng.uniform(0.5, 1, (persons, 21, 1))], axis=2)
    boxes = np.tile([1.0, 1.0, 30.0, 30.0], (persons, 1))
    return PoseResult(kpts, boxes, np.full(persons, 0.9), 32, 32).to_api(log_id=1)


def test_export_report_recount_and_rerun_read_pending_tables(tmp_path, monkeypatch):
    from posebatch.exports.run import ExportOptions, export
    from posebatch.exports.source import JobOutput
    from posebatch.recount import recount
    from posebatch.report.build import build_report
    from producer.rerun import NEW, rerun_plan

    src_dir, out = tmp_path / "in", tmp_path / "out"
    src_dir.mkdir()
    out.mkdir()
    job = JobSettings()
    (out / MANIFEST_NAME).write_text(json.dumps(manifest(job)))
    src, dst = open_storage(str(src_dir)), open_storage(str(out))
    meta = {"input": src.url, "output": dst.url, "settings": job.to_dict()}
    jobs = [[f"a{i}.jpg" for i in range(40)], ["a3.jpg", "b1.jpg"], ["c1.jpg", "c2.jpg"]]
    for n, keys in enumerate(jobs, 1):
        recs = []
        for k in keys:
            (src_dir / k).write_bytes(jpeg(32, 32))
            (out / f"{k}.json").write_bytes(encode_result(api_result(n)))
            recs.append(Record(k, True, None, n, n, width=32, height=32))
        finalize(dst, iter(recs), {**meta, "job_id": f"j{n}"}, "", merge_root=True)
    everything = sorted({k for keys in jobs for k in keys})
    assert len(read_index(dst).pending) == 2  # 4 pending rows < 40 / 8: not compacted
    job_out = JobOutput(str(out))
    assert [r.key for r in job_out.rows()] == everything
    assert job_out.summary["images_seen"] == 40  # the base's counts, pending listed
    exact = job_out.current_summary()
    assert exact["images_seen"] == 43 and exact["persons_total"] == 39 * 1 + 2 * 2 + 2 * 3

    got = export(str(out), ExportOptions("coco", tmp_path / "coco"))
    assert (got.images, got.sizes_read) == (43, 0)

    page = build_report(str(out), tmp_path / "report").read_text()
    assert ">43<" in page

    (src_dir / "new.jpg").write_bytes(jpeg(32, 32))
    with rerun_plan(src, dst, None) as plan:
        assert [(info.key, why) for info, why in plan] == [("new.jpg", NEW)]

    s = recount(dst, {})
    assert s["images_seen"] == 43 and read_index(dst).pending == ()
    with current_rows(dst) as rows:
        assert [r.key for r in rows] == everything


def test_sizes_of_skipped_images_are_carried_or_read_once_at_the_compaction(tmp_path,
                                                                               monkeypatch):
    """A job end reads no image; the compaction carries a known size from the replaced row and
    reads the header (a ranged peek) only of the images no table knows."""
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for k in ("known.jpg", "unknown.jpg"):
        (src_dir / k).write_bytes(jpeg(40, 30))
    src, dst = open_storage(str(src_dir)), open_storage(str(tmp_path / "out"))
    filler = [Record(f"f{i:03d}.jpg", True, None, 1, 1, width=9, height=9) for i in range(100)]
    finalize(dst, iter([*filler, Record("known.jpg", True, None, 1, 1, width=400, height=300)]),
             {"job_id": "j1", "input": src.url}, "", merge_root=True)
    peeks: list[str] = []
    real_peek = type(src).peek
    monkeypatch.setattr(type(src), "peek", lambda self, key, n: peeks.append(key) or
                        real_peek(self, key, n))
    skipped = [Record("known.jpg", True, None, 2, 2), Record("unknown.jpg", True, None, 1, 1)]
    finalize(dst, iter(skipped), {"job_id": "j2", "input": src.url}, "", merge_root=True,
             src=src)
    assert peeks == [] and len(read_index(dst).pending) == 1
    compact(dst)
    assert peeks == ["unknown.jpg"]
    with current_rows(dst) as rows:
        got = {r.key: (r.person_num, r.width, r.height) for r in rows}
    assert got["known.jpg"] == (2, 400, 300) and got["unknown.jpg"] == (1, 40, 30)


def test_an_index_naming_a_file_outside_the_jobs_folder_is_refused(tmp_path):
    from posebatch.errors import ConfigError

    dst = open_storage(str(tmp_path / "out"))
    end_jobs(dst, [[Record("a.jpg", True, None, 1, 1)]])
    dst.write(INDEX_NAME, json.dumps({"format": 1, "base_rows": 1, "pending": [
        {"job_id": "..", "rows": 1}]}).encode())
    with pytest.raises(ConfigError, match="not a folder name"):
        read_index(dst)
