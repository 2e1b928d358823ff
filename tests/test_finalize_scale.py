"""A job's end at scale (issue 22, item 4): the finalize lock is renewed during every long step,
sizes never need a full GET of an image, and the existence check of a task lists pages sized to
the task. Real redis-server and SeaweedFS; storage calls counted by wrapping the real backend."""

from __future__ import annotations

import csv
import io
import time

from posebatch.aggregate import COUNTS_NAME, CSV_COLUMNS
from posebatch.jobend import maybe_finalize
from posebatch.records import Record
from posebatch.s3storage import S3Storage, make_s3_client
from tests.images import jpeg
from workers.batch import listed_results


def earlier_table(n: int) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(CSV_COLUMNS)
    for i in range(n):
        w.writerow([f"old/{i:08d}.jpg", "ok", "", 1, 1, "", 640, 480])
    return ("\ufeff" + buf.getvalue()).encode()


def test_the_lock_is_renewed_while_a_long_download_of_earlier_rows_runs(
        store, bucket, monkeypatch):
    """The lock's term is 1 s here and the download of the earlier table takes 2.5 s: without
    renewals during it, the lock lapses and the finalizer cannot say done."""
    monkeypatch.setattr("posebatch.jobstate.FINALIZE_LOCK_SECONDS", 1)
    out = S3Storage(bucket, "out")
    out.write(COUNTS_NAME, earlier_table(20_000), "text/csv")
    real = S3Storage.download

    def slow_download(self, key, path):  # a slow link: the earlier rows take long to come
        time.sleep(2.5)
        return real(self, key, path)

    monkeypatch.setattr(S3Storage, "download", slow_download)
    store.create("j", {"input": None, "output": out.url, "settings": {}})
    store.mark_submitted("j", 2, 1)
    store.add_records("j", [Record("a.jpg", True, None, 1, 1, width=4, height=3),
                            Record("b.jpg", True, None, 0, 0, width=4, height=3)])
    assert maybe_finalize(store, "j") is True
    assert store.progress("j").state == "done"
    assert store.last_lock.renewals >= 6  # every quarter term, across the 2.5 s download
    # No summary at the root: a base of unknown size, so this job end compacted, holding the
    # output's tables lock, renewed as well through the download.
    assert store.last_output_lock.renewals >= 6
    rows = list(csv.DictReader(io.StringIO(out.read(COUNTS_NAME).decode("utf-8-sig"))))
    assert len(rows) == 20_002


def test_sizes_unknown_to_any_table_come_from_a_ranged_get_never_a_full_one(
        store, bucket, monkeypatch):
    src = S3Storage(bucket, "in")
    sizes = {f"p{i}.jpg": (64 + i, 48 + i) for i in range(5)}
    for key, (w, h) in sizes.items():
        src.write(key, jpeg(w, h), "image/jpeg")
    src.write("rotated.jpg", jpeg(80, 60, orientation=6), "image/jpeg")
    sizes["rotated.jpg"] = (60, 80)
    reads: list[str] = []
    peeks: list[str] = []
    real_read, real_peek = S3Storage.read, S3Storage.peek

    def counted_read(self, key, max_bytes=None):
        reads.append(key)
        return real_read(self, key, max_bytes)

    def counted_peek(self, key, n):
        peeks.append(key)
        return real_peek(self, key, n)

    monkeypatch.setattr(S3Storage, "read", counted_read)
    monkeypatch.setattr(S3Storage, "peek", counted_peek)
    out = S3Storage(bucket, "out")
    store.create("j", {"input": src.url, "output": out.url, "settings": {}})
    store.mark_submitted("j", len(sizes), 1)
    # Skipped images (results existed, recorded by a worker that died): no size on record.
    store.add_records("j", [Record(k, True, None, 1, 1) for k in sizes])
    assert maybe_finalize(store, "j")
    rows = {r["key"]: (int(r["width"]), int(r["height"])) for r in csv.DictReader(
        io.StringIO(out.read(COUNTS_NAME).decode("utf-8-sig")))}
    assert rows == sizes
    assert [k for k in reads if k.endswith(".jpg")] == []  # no image downloaded whole
    assert sorted(peeks) == sorted(sizes)


def test_the_existence_list_of_a_task_is_sized_to_the_task(bucket):
    listed: list[int] = []
    client = make_s3_client()
    client.meta.events.register(
        "before-call.s3.ListObjectsV2",
        lambda params, **_: listed.append(params["query_string"]["max-keys"]))
    dst = S3Storage(bucket, "out", client=client)
    for i in range(300):
        dst.write(f"img/{i:04d}.jpg.json", b"{}", "application/json")
    keys = [f"img/{i:04d}.jpg" for i in range(100, 118)]  # a task of 32, 18 of them done
    keys += [f"img/{i:04d}x.jpg" for i in range(14)]  # new: no result yet
    found = listed_results(dst, keys)
    assert {f"{k}.json" for k in keys} & found == {f"img/{i:04d}.jpg.json"
                                                   for i in range(100, 118)}
    assert listed and max(listed) <= 2 * 32 + 8  # pages of the task's size, not of 1000
