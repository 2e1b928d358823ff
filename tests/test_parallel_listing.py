"""Parallel listing for `submit` (issue 22, item 1): the sub-prefixes of INPUT are listed by
several paginators at once, and the result is the sequential listing's, each key once. Real
SeaweedFS."""

from __future__ import annotations

import threading

import pytest

from posebatch.errors import StorageNotFound
from posebatch.s3storage import S3Storage, make_s3_client
from producer.rerun import listed_objects


def test_parallel_listing_yields_every_key_once_from_several_paginators(bucket, s3_server):
    client = s3_server.client()
    keys = [f"in/top{i}.jpg" for i in range(3)]
    keys += [f"in/cam{c}/{d:02d}/IMG_{i:03d}.jpg" for c in range(3) for d in range(4)
             for i in range(9)]
    keys += [f"in/odd name/x{i}.png" for i in range(20)]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (len(key) % 7 + 1))
    client.put_object(Bucket=bucket, Key="in/cam0/", Body=b"")  # a folder marker
    prefixes: list[str] = []
    threads: set[str] = set()
    s3 = make_s3_client()

    def seen(params, **_):
        prefixes.append(params["query_string"].get("prefix", ""))
        threads.add(threading.current_thread().name)

    s3.meta.events.register("before-call.s3.ListObjectsV2", seen)
    src = S3Storage(bucket, "in", client=s3, page_size=7)  # many pages per paginator
    sequential = list(src.iter_objects())
    prefixes.clear()
    parallel = list(src.iter_objects(parallel=4))
    assert len(parallel) == len(sequential) == len(keys)
    assert {(i.key, i.etag, i.size) for i in parallel} == {
        (i.key, i.etag, i.size) for i in sequential}
    # One delimiter listing of the root, then one paginator per sub-prefix.
    assert {"in/", "in/cam0/", "in/cam1/", "in/cam2/", "in/odd name/"} == set(prefixes)
    assert len([t for t in threads if t.startswith("list")]) >= 2  # several paginators ran
    # Through the selection, as `submit` lists: the same images.
    assert sorted(i.key for i in listed_objects(src, None, parallel=4)) == sorted(
        k[len("in/"):] for k in keys)


def test_a_listing_error_reaches_the_caller(bucket, s3_server):
    with pytest.raises(StorageNotFound):
        list(S3Storage(f"{bucket}-missing", "in").iter_objects(parallel=4))
