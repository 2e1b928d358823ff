"""Several jobs into one output (issue 11, row 11): the root `_summary.json` / `_counts.csv`
cover every result in the output, the newest record of an image winning; each job's own figures
are in `_jobs/<job id>/`. Real redis-server, real output folder, the CSV read back by csv."""

from __future__ import annotations

import json

import pytest

from posebatch.aggregate import records_from_counts_csv
from posebatch.jobend import maybe_finalize
from posebatch.jobstate import JobStore
from posebatch.records import Record


def run_job(store: JobStore, out, job_id: str, keys: list[str], persons: int) -> None:
    store.create(job_id, {"input": "in/", "output": str(out), "settings": {}})
    store.mark_submitted(job_id, len(keys), 1)
    store.add_records(job_id, [Record(k, True, None, persons, persons) for k in keys])
    assert maybe_finalize(store, job_id)


@pytest.mark.parametrize(("jobs", "root_seen", "root_persons"), [
    ([[f"a/{i}.jpg" for i in range(10)], [f"b/{i}.jpg" for i in range(3)]], 13, 10 * 1 + 3 * 2),
    ([[f"a/{i}.jpg" for i in range(10)], ["a/0.jpg", "a/1.jpg"]], 10, 8 * 1 + 2 * 2),
    ([["x.jpg"], ["y.jpg"], ["z.jpg"]], 3, 1 + 2 + 3),
], ids=["two-inputs-one-output", "rerun-of-a-subset", "three-jobs"])
def test_the_root_summary_covers_every_job_written_into_the_output(
        redis_server, tmp_path, jobs, root_seen, root_persons):
    redis_server.start()
    store = JobStore(redis_server.client())
    store.r.flushall()
    for n, keys in enumerate(jobs, start=1):
        run_job(store, tmp_path, f"job{n}", keys, persons=n)
    summary = json.loads((tmp_path / "_summary.json").read_text())
    rows = records_from_counts_csv((tmp_path / "_counts.csv").read_bytes())
    assert summary["images_seen"] == len(rows) == root_seen
    assert summary["persons_total"] == sum(r.person_num for r in rows) == root_persons
    assert [r.key for r in rows] == sorted({k for keys in jobs for k in keys})
    assert summary["job_id"] == f"job{len(jobs)}"
    for n, keys in enumerate(jobs, start=1):  # each job's own figures
        own = json.loads((tmp_path / "_jobs" / f"job{n}" / "_summary.json").read_text())
        assert own["images_seen"] == len(keys) and own["job_id"] == f"job{n}"
