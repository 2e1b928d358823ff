"""``watch --incremental``: a poll lists only past the last key it listed (S3 StartAfter), so an
append-only drop folder costs O(new) requests; what sorts before the cursor is left to the full
poll, which does not take the incremental polls' submissions for re-uploads. Real SeaweedFS and
redis-server; jobs are queued (no worker needed to see what was submitted)."""

from __future__ import annotations

import pytest

from posebatch import s3storage
from posebatch.jobstate import JobStore
from posebatch.settings import JobSettings
from producer import watch as watch_mod
from tests.images import jpeg


def submitted(store: JobStore, jobs: list[str]) -> list[str]:
    keys: list[str] = []
    for job_id in jobs:
        for batch in sorted(store.pending_batches(job_id)):
            keys += store.batch_keys(job_id, batch) or []
    return sorted(keys)


@pytest.mark.cluster
def test_incremental_polls_list_past_the_cursor_and_the_full_poll_adds_only_the_missed(
        redis_server, s3_server, bucket, monkeypatch):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    store = JobStore(r)
    client = s3_server.client()
    for key in ("day1/a.jpg", "day1/b.jpg"):
        client.put_object(Bucket=bucket, Key=f"in/{key}", Body=jpeg(32, 24))
    src, out = f"s3://{bucket}/in/", f"s3://{bucket}/out/"
    starts: list[str | None] = []
    real_client = s3storage.make_s3_client

    def counting_client(**kwargs):
        c = real_client(**kwargs)
        c.meta.events.register("before-call.s3.ListObjectsV2",
                               lambda params, **_: starts.append(
                                   params.get("query_string", {}).get("start-after")))
        return c

    monkeypatch.setattr("posebatch.s3storage.make_s3_client", counting_client)
    kw = {"job": JobSettings(), "broker_url": redis_server.url}
    first = watch_mod.poll_incremental(src, out, **kw)
    assert submitted(store, first) == ["day1/a.jpg", "day1/b.jpg"]
    client.put_object(Bucket=bucket, Key="in/day2/c.jpg", Body=jpeg(32, 24))
    client.put_object(Bucket=bucket, Key="in/day0/late.jpg", Body=jpeg(32, 24))  # sorts before
    starts.clear()
    second = watch_mod.poll_incremental(src, out, **kw)
    assert submitted(store, second) == ["day2/c.jpg"]  # day0/late.jpg is behind the cursor
    assert starts == ["in/day1/b.jpg"], starts  # one LIST, from past the last key listed
    assert watch_mod.poll_incremental(src, out, **kw) == []  # nothing new: no job
    full = watch_mod.poll_once(src, out, **kw)  # the reconciliation finds only the missed one
    assert submitted(store, full) == ["day0/late.jpg"]
