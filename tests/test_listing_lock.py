"""The control worker's listing lock outlives a long back-pressure wait (issue 22, item 6): a
scheduled submission waiting for workers to drain the queue keeps refreshing it, so the next
run of the same schedule does not list the same input meanwhile. Real redis-server, folders."""

from __future__ import annotations

import threading
import time

from producer import control
from tests.images import jpeg


def test_the_listing_lock_is_refreshed_while_submit_waits_for_the_queue(
        redis_server, tmp_path, monkeypatch):
    redis_server.start()
    r = redis_server.client()
    r.flushall()
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i in range(70):  # two enqueue groups of batches of 1: the second one waits
        (src / f"{i}.jpg").write_bytes(jpeg(16, 12))
    monkeypatch.setenv("POSEBATCH_BROKER_URL", redis_server.url)
    monkeypatch.setenv("POSEBATCH_QUEUE_HIGH_WATER", "1")
    monkeypatch.setattr(control, "LISTING_LOCK_SECONDS", 2)
    lock = control.schedule_key(str(src), str(out)) + ":lock"
    done: list[str] = []
    runner = threading.Thread(target=lambda: done.append(control.submit_job.run(
        str(src), str(out), batch_images=1)))
    runner.start()
    try:
        time.sleep(4.5)  # no worker: the queue stays over the high water, submit waits
        assert runner.is_alive() and not done
        assert r.exists(lock), "the listing lock lapsed during the back-pressure wait"
    finally:
        for _ in range(100):  # drain the queue as workers would, so submit can finish
            r.delete("posebatch")
            if not runner.is_alive():
                break
            time.sleep(0.2)
        runner.join(30)
    assert done and not r.exists(lock)
