"""A batch's failure is a typed field (issue 22, item 7): ``Record.batch_failure``, set by the
worker's policy, kept in the Redis record and in the count table's ``batch_failure`` column,
read back by a rerun (it retries the image) and by the end of a ``--force`` job (the output
stays marked unfinished). Records and tables written before the field still count their 282000
"batch ..." rows, through one function (``legacy_batch_failure``); nothing else reads the
message. Real redis-server, real output folders."""

from __future__ import annotations

import csv
import io
import json

from posebatch.aggregate import (
    COUNTS_NAME,
    CSV_COLUMNS,
    PREVIOUS_COLUMNS,
    records_from_counts_csv,
)
from posebatch.errors import INTERNAL_ERROR
from posebatch.jobend import maybe_finalize
from posebatch.manifest import claim_output, manifest, read_manifest
from posebatch.records import Record
from posebatch.roottables import compact, iter_counts_csv
from posebatch.settings import JobSettings
from posebatch.storage import LocalStorage
from producer.rerun import RETRY, rerun_plan
from tests.images import jpeg

FLAGGED = Record("b.jpg", False, INTERNAL_ERROR, 0, 0, "worker lost on every attempt",
                 batch_failure=True)
"""A batch's failure whose message says nothing of batches: only the field tells."""
ALONE = Record("c.jpg", False, 216201, 0, 0, "not JPEG, PNG or BMP")
OK = Record("a.jpg", True, None, 1, 1, width=16, height=12)


def table(rows: list[list[object]], columns: tuple[str, ...]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(columns)
    w.writerows(rows)
    return ("\ufeff" + buf.getvalue()).encode()


def test_the_flag_survives_redis_and_older_records_count_by_their_message(store):
    store.create("j", {"input": None, "output": "/nowhere", "settings": {}})
    store.add_records("j", [OK, FLAGGED, ALONE])
    # Written by an older worker (a rolling upgrade): packed without the flag, and as JSON.
    store.r.hset("posebatch:job:j:records", mapping={
        "old.jpg": "E282000,batch 00000007 failed after 5 attempts: S3 read failed",
        "oldjson.jpg": json.dumps({"key": "oldjson.jpg", "ok": False, "error_code": 282000,
                                   "person_num": 0, "valid_persons": 0,
                                   "error_msg": "batch 00000008 cannot run: no model"}),
        "other.jpg": "E282000,refused key: '..' in the name"})
    got = {r.key: r.batch_failure for r in store.records("j")}
    assert got == {"a.jpg": False, "b.jpg": True, "c.jpg": False, "old.jpg": True,
                   "oldjson.jpg": True, "other.jpg": False}


def test_a_job_end_writes_the_column_and_a_rerun_retries_the_flagged_image(store, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for r in (OK, FLAGGED, ALONE):
        (src / r.key).write_bytes(jpeg(16, 12))
    store.create("j", {"input": str(src), "output": str(out), "settings": {}})
    store.mark_submitted("j", 3, 1)
    store.add_records("j", [OK, FLAGGED, ALONE])
    assert maybe_finalize(store, "j")
    body = (out / COUNTS_NAME).read_bytes()
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["key"]: r["batch_failure"] for r in rows} == {"a.jpg": "", "b.jpg": "1",
                                                            "c.jpg": ""}
    assert {r.key: r.batch_failure for r in records_from_counts_csv(body)} == {
        "a.jpg": False, "b.jpg": True, "c.jpg": False}
    with rerun_plan(LocalStorage(str(src)), LocalStorage(str(out)), None) as plan:
        assert {info.key: why for info, why in plan} == {"b.jpg": RETRY}


def test_older_tables_count_their_batch_rows_once_and_the_column_wins_in_new_ones(tmp_path):
    old = [["a.jpg", "error", 282000, 0, 0, "batch 00000001 failed: storage unreachable",
            "", "", "", ""],
           ["b.jpg", "error", 282000, 0, 0, "refused key: '..' in the name", "", "", "", ""],
           ["c.jpg", "ok", "", 1, 1, "", 16, 12, "e", 9]]
    oldest = [row[:8] for row in old]  # before etag/bytes: read through the dict path
    new = [[*old[0], ""], [*old[1], ""], [*old[2], ""],
           ["d.jpg", "error", 216200, 0, 0, "no image data: access denied", "", "", "", "",
            "1"]]
    want_old = {"a.jpg": True, "b.jpg": False, "c.jpg": False}
    for name, data, columns, want in [
            ("previous", old, PREVIOUS_COLUMNS, want_old),
            ("oldest", oldest, PREVIOUS_COLUMNS[:8], want_old),
            # a current table: an empty column is False whatever the message says
            ("current", new, CSV_COLUMNS, {**dict.fromkeys("abc", False), "d": True})]:
        path = tmp_path / f"{name}.csv"
        path.write_bytes(table(data, columns))
        want = {(k if "." in k else f"{k}.jpg"): v for k, v in want.items()}
        assert {r.key: r.batch_failure for r in iter_counts_csv(path)} == want, name
        assert {r.key: r.batch_failure
                for r in records_from_counts_csv(path.read_bytes())} == want, name
    # A compaction rewrites an older base with the column: the message is not read again.
    out = LocalStorage(str(tmp_path / "out"))
    out.write(COUNTS_NAME, table(old, PREVIOUS_COLUMNS), "text/csv")
    compact(out)
    rows = list(csv.DictReader(io.StringIO(out.read(COUNTS_NAME).decode("utf-8-sig"))))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert {r["key"]: r["batch_failure"] for r in rows} == {"a.jpg": "1", "b.jpg": "",
                                                            "c.jpg": ""}


def test_a_force_job_with_a_failed_batch_leaves_the_output_marked_unfinished(store, tmp_path):
    out = LocalStorage(str(tmp_path / "out"))
    model = {"sha256": "new" * 8, "name": "new.onnx"}
    claim_output(out, manifest(JobSettings(), "old" * 8, "old.onnx"), force=False)
    claim_output(out, manifest(JobSettings(), model["sha256"], model["name"]), force=True)
    assert read_manifest(out)["complete"] is False
    for job_id, records, complete in [("failed", [OK, FLAGGED], False),
                                      ("redone", [OK, Record("b.jpg", True, None, 0, 0)],
                                       True)]:
        store.create(job_id, {"input": None, "output": out.url, "force": True,
                              "settings": JobSettings().to_dict()})
        store.mark_submitted(job_id, len(records), 1)
        store.note_model(job_id, model)
        store.add_records(job_id, records)
        assert maybe_finalize(store, job_id)
        assert read_manifest(out)["complete"] is complete, job_id
