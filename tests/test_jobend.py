"""The job store only stores; the end of a job is ``posebatch.jobend`` (issue 22, item 7). The
worker's policy reaches both through ``workers.state.PolicyState``: driven here over a real
redis-server and a real output folder, a batch that succeeds and one that fails end the job
with its tables written, the failed batch's images flagged ``batch_failure``."""

from __future__ import annotations

import csv
import io

from posebatch.aggregate import COUNTS_NAME
from posebatch.errors import PermanentError
from posebatch.jobstate import JobStore
from posebatch.records import Record
from tests.importgraph import import_graph
from workers import policy
from workers.state import PolicyState


def test_the_store_reaches_no_table_storage_or_finalize_code():
    graph = import_graph()
    assert graph["posebatch.jobstate"] & {
        "posebatch.finalize", "posebatch.roottables", "posebatch.storage",
        "posebatch.manifest", "posebatch.aggregate", "posebatch.jobend"} == set()
    assert "posebatch.jobstate" in graph["posebatch.jobend"]
    assert not hasattr(JobStore, "maybe_finalize") and not hasattr(JobStore, "write_aggregates")


def test_the_worker_policy_ends_a_job_through_the_store_and_the_job_end(store, tmp_path):
    out = tmp_path / "out"
    store.create("j", {"input": None, "output": str(out), "settings": {}})
    store.add_batches("j", {"00000000": ["a.jpg", "b.jpg"], "00000001": ["c.jpg", "d.jpg"]})
    store.mark_submitted("j", 4, 2)
    state = PolicyState(store)

    def ok() -> list[Record]:
        return [Record(k, True, None, 1, 1, width=4, height=3) for k in ("a.jpg", "b.jpg")]

    def refused() -> list[Record]:
        raise PermanentError("S3 refuses writes: AccessDenied")

    assert policy.run_batch(state, policy.Attempt("j", "00000000", ["a.jpg", "b.jpg"], 0),
                            ok, patience=1) == 2
    assert store.progress("j").state == "running"
    assert policy.run_batch(state, policy.Attempt("j", "00000001", ["c.jpg", "d.jpg"], 0),
                            refused, patience=1) == 0
    p = store.progress("j")
    assert (p.state, p.done, p.failed) == ("done", 4, 2)
    assert store.r.exists("posebatch:job:j:records") == 0  # in the table now, not in Redis
    rows = list(csv.DictReader(io.StringIO((out / COUNTS_NAME).read_text("utf-8-sig"))))
    assert {r["key"]: (r["status"], r["batch_failure"]) for r in rows} == {
        "a.jpg": ("ok", ""), "b.jpg": ("ok", ""), "c.jpg": ("error", "1"),
        "d.jpg": ("error", "1")}
