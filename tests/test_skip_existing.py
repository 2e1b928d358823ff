"""Skip-existing looks results up with one listing per batch, not a GET per image (issue 10):
new images cost no request at all, done ones one GET each (their record is rebuilt from it).
Real folder and real SeaweedFS; the storage is wrapped only to count its calls."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from posebatch.settings import JobSettings
from posebatch.storage import open_storage
from workers.batch import _filter_existing, listed_results

DONE = {"person_num": 0, "person_info": [], "log_id": 1}


class Counting:
    def __init__(self, inner) -> None:
        self.inner, self.reads, self.lists = inner, 0, 0

    def read(self, key: str) -> bytes:
        self.reads += 1
        return self.inner.read(key)

    def iter_keys(self, *args, **kwargs):
        self.lists += 1
        return self.inner.iter_keys(*args, **kwargs)


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_only_done_images_are_read_and_the_batch_is_one_listing(where, tmp_path, request):
    if where == "s3":
        bucket = request.getfixturevalue("bucket")
        dst = open_storage(f"s3://{bucket}/out/")
    else:
        dst = open_storage(str(tmp_path / "out"))
    keys = [f"d/{i:03d}.jpg" for i in range(40)]
    done_keys = keys[3:6] + ["d/039.jpg"]
    for k in done_keys:
        dst.write(k + ".json", json.dumps(DONE).encode())
    dst.write("d/000.jpg.jsonx", b"{}")  # near misses in the range are not results
    dst.write("e/other.jpg.json", b"{}")  # outside the range
    counting = Counting(dst)
    recorded: list[str] = []
    with ThreadPoolExecutor(4) as pool:
        todo = list(_filter_existing(keys, counting, JobSettings(),
                                     lambda k, _r: recorded.append(k), pool))
    assert sorted(recorded) == sorted(done_keys)
    assert todo == [k for k in keys if k not in done_keys]
    assert counting.reads == len(done_keys) and counting.lists == 1


def test_a_missing_output_means_nothing_is_done(tmp_path):
    assert listed_results(open_storage(str(tmp_path / "nothing")), ["a.jpg"]) == set()
