"""The batch policy: every way a batch can end leaves each image recorded once, or the batch
queued again (unit tests on an in-memory job state; tests/test_faults.py does it for real)."""

from __future__ import annotations

import pytest

from posebatch.errors import (
    INTERNAL_ERROR,
    ModelError,
    StateUnavailable,
    StorageError,
    StorageUnreachable,
)
from posebatch.records import Record
from tests.stubs import MemoryJobState
from workers import policy

KEYS = ["a.jpg", "b.jpg"]


def ok_records() -> list[Record]:
    return [Record(k, True, None, 1, 1) for k in KEYS]


def raises(err: Exception):
    def work() -> list[Record]:
        raise err

    return work


@pytest.mark.parametrize(("work", "retries", "outcome", "recorded_ok"), [
    (ok_records, 0, 2, True),
    (raises(StorageError("S3 timed out")), 0, policy.Retry, None),
    (raises(StorageError("S3 timed out")), 3, policy.Retry, None),
    (raises(StorageError("S3 timed out")), policy.MAX_RETRIES, 0, False),
    (raises(ModelError("bad model")), 0, 0, False),
    (raises(ZeroDivisionError("bug")), 0, 0, False),
    (raises(StateUnavailable("redis gone")), 0, policy.Requeue, None),
], ids=["ok", "storage-retry", "storage-last-retry", "storage-gives-up", "permanent",
        "bug", "state-down-in-work"])
def test_a_batch_ends_recorded_retried_or_requeued(work, retries, outcome, recorded_ok):
    state = MemoryJobState(total=2)
    attempt = policy.Attempt("job", "00000000", KEYS, retries)
    if isinstance(outcome, type):
        with pytest.raises(outcome):
            policy.run_batch(state, attempt, work, patience=0.01)
        assert state.records["job"] == {}  # nothing recorded: it will run again
        return
    assert policy.run_batch(state, attempt, work, patience=0.01) == outcome
    recs = state.records["job"]
    assert sorted(recs) == KEYS and state.finalized == 1
    assert all(r.ok is recorded_ok for r in recs.values())
    # The policy marks its own failures; the rerun reads the field, never the message.
    assert all(r.batch_failure is not recorded_ok for r in recs.values())
    if not recorded_ok:
        assert all(r.error_code == INTERNAL_ERROR and "batch 00000000" in r.error_msg
                   for r in recs.values())


OUTAGE = StorageUnreachable("S3 read failed: EndpointConnectionError")


@pytest.mark.parametrize(("retries", "outcome"), [
    (0, 1), (4, 16), (6, 60), (14, 60),  # countdowns until the patience is spent
    (policy.MAX_RETRIES, 16),  # an outage is not bounded by the count of other errors
    (15, "failed"),  # 1+2+...+32 + 9 x 60 = 603 s waited: past the 600 s patience
], ids=["first", "fifth", "capped", "last", "beyond-max-retries", "patience-spent"])
def test_a_storage_outage_is_waited_out_for_minutes_then_fails(retries, outcome):
    """Issue 11 row 8: retries of 1+2+4+8 s failed every image of a 20 s outage."""
    state = MemoryJobState(total=2)
    attempt = policy.Attempt("job", "00000000", KEYS, retries)
    if outcome == "failed":
        assert policy.outage_waited(retries) >= policy.STORAGE_PATIENCE
        assert policy.run_batch(state, attempt, raises(OUTAGE), patience=0.01) == 0
        assert all("storage unreachable for" in r.error_msg for r in state.records["job"].values())
        return
    with pytest.raises(policy.Retry) as info:
        policy.run_batch(state, attempt, raises(OUTAGE), patience=0.01)
    assert info.value.countdown == outcome
    assert "storage unreachable" in state.waiting and state.records["job"] == {}


def test_retry_backs_off_exponentially_up_to_a_cap():
    assert [policy.backoff(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_poison_batch_is_failed_after_max_deliveries_and_keeps_done_images():
    state = MemoryJobState(total=2)
    state.records["job"]["a.jpg"] = Record("a.jpg", True, None, 3, 2)
    attempt = policy.Attempt("job", "b1", KEYS, 0)
    for _ in range(policy.MAX_DELIVERIES):
        state.count_delivery("job", "b1")  # earlier deliveries, each killed its worker
    ran = []
    assert policy.run_batch(state, attempt, lambda: ran.append(1) or [], patience=0.01) == 0
    assert ran == []  # not started again
    assert state.records["job"]["a.jpg"].ok  # the image done earlier keeps its result
    assert "abandoned after" in state.records["job"]["b.jpg"].error_msg


def test_a_batch_of_an_unknown_job_is_dropped_without_running():
    state = MemoryJobState(jobs=set())
    state.records["gone"] = {}
    attempt = policy.Attempt("gone", "b1", KEYS, 0)
    assert policy.run_batch(state, attempt, raises(AssertionError("ran")), patience=0.01) == 0


def test_a_short_state_outage_is_waited_out_and_a_long_one_requeues():
    state = MemoryJobState(total=2)
    state.down = 2  # two failed calls, then Redis is back
    attempt = policy.Attempt("job", "b1", KEYS, 0)
    assert policy.run_batch(state, attempt, ok_records, patience=30) == 2
    state = MemoryJobState(total=2)
    state.down = -1
    with pytest.raises(policy.Requeue):
        policy.run_batch(state, attempt, ok_records, patience=0.01)
