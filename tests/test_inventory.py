"""S3 Inventory reports as the listing of INPUT (``producer.inventory``): real SeaweedFS holding
a report in the layout and format AWS writes, real redis-server and a worker process for the
submit."""

from __future__ import annotations

import hashlib
import json

import pytest

from posebatch.errors import ConfigError
from posebatch.storage import open_storage
from posebatch.testing.cluster import WorkerProcess, run_cli
from producer.inventory import as_csv_gz, inventory_objects, latest_manifest
from tests.images import jpeg

SCHEMA = "Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, LastModifiedDate, ETag"
CONFIG = "inv/src-bucket/daily"


def put_report(client, dest: str, source: str, stamp: str, rows: list[list[str]],
               fmt: str = "CSV", corrupt: bool = False) -> str:
    """One report as S3 writes it: data file(s) under data/, a dated manifest.json."""
    body = as_csv_gz(rows)
    data_key = f"{CONFIG}/data/{stamp}.csv.gz"
    client.put_object(Bucket=dest, Key=data_key, Body=body[:-8] if corrupt else body)
    manifest = {"sourceBucket": source, "destinationBucket": f"arn:aws:s3:::{dest}",
                "version": "2016-11-30", "fileFormat": fmt, "fileSchema": SCHEMA,
                "files": [{"key": data_key, "size": len(body),
                           "MD5checksum": hashlib.md5(body).hexdigest()}]}
    key = f"{CONFIG}/{stamp}/manifest.json"
    client.put_object(Bucket=dest, Key=key, Body=json.dumps(manifest).encode())
    return f"s3://{dest}/{key}"


def row(bucket: str, key: str, size: int = 10, etag: str = "abc", latest: str = "true",
        marker: str = "false") -> list[str]:
    return [bucket, key, "", latest, marker, str(size), "2026-12-01T00:00:00.000Z", etag]


def test_a_report_lists_inputs_objects_decoded_and_current_only(s3_server, bucket):
    client = s3_server.client()
    put_report(client, bucket, bucket, "2026-11-30T01-00Z", [row(bucket, "in/old.jpg")])
    url = put_report(client, bucket, bucket, "2026-12-01T01-00Z", [
        row(bucket, "in/a+b%2Bc.jpg", 11, "e1"),        # "a b+c.jpg": S3 URL-encodes CSV keys
        row(bucket, "in/sub/x.jpg", 12, "e2"),
        row(bucket, "in/gone.jpg", marker="true"),      # a delete marker
        row(bucket, "in/older.jpg", latest="false"),    # a non-current version
        row(bucket, "elsewhere/y.jpg"),                 # outside INPUT's prefix
        row("other-bucket", "in/z.jpg"),                # another bucket's row
        row(bucket, "in/folder/"),                      # a folder marker
    ])
    src = open_storage(f"s3://{bucket}/in/")
    got = {(o.key, o.etag, o.size) for o in inventory_objects(url, src)}
    assert got == {("a b+c.jpg", "e1", 11), ("sub/x.jpg", "e2", 12)}
    # the configuration's folder: its newest dated report
    assert latest_manifest(f"s3://{bucket}/{CONFIG}/") == url
    assert {o.key for o in inventory_objects(f"s3://{bucket}/{CONFIG}/", src)} == {
        "a b+c.jpg", "sub/x.jpg"}


def test_a_damaged_or_unreadable_report_stops_with_a_clear_error(s3_server, bucket):
    client = s3_server.client()
    src = open_storage(f"s3://{bucket}/in/")
    bad = put_report(client, bucket, bucket, "2026-12-01T01-00Z", [row(bucket, "in/a.jpg")],
                     corrupt=True)
    with pytest.raises(ConfigError, match="MD5checksum"):
        list(inventory_objects(bad, src))
    orc = put_report(client, bucket, bucket, "2026-12-02T01-00Z", [], fmt="ORC")
    with pytest.raises(ConfigError, match="fileFormat ORC"):  # neither CSV nor Parquet
        list(inventory_objects(orc, src))
    with pytest.raises(ConfigError, match="no report found"):
        list(inventory_objects(f"s3://{bucket}/nothing-here/", src))
    with pytest.raises(ConfigError, match="not INPUT's bucket"):
        list(inventory_objects(put_report(client, bucket, "another", "2026-12-03T01-00Z", []),
                               src))


@pytest.mark.cluster
def test_submit_from_a_report_processes_exactly_its_images(redis_server, s3_server, bucket,
                                                            tmp_path):
    redis_server.start()
    redis_server.client().flushall()
    client = s3_server.client()
    for key in ("in/a.jpg", "in/b.jpg", "in/not-in-report.jpg"):
        client.put_object(Bucket=bucket, Key=key, Body=jpeg(40, 30))
    heads = {k: client.head_object(Bucket=bucket, Key=f"in/{k}") for k in ("a.jpg", "b.jpg")}
    put_report(client, bucket, bucket, "2026-12-01T01-00Z", [
        row(bucket, f"in/{k}", h["ContentLength"], h["ETag"].strip('"'))
        for k, h in heads.items()])
    env = {**s3_server.env(), "POSEBATCH_BROKER_URL": redis_server.url}
    worker = WorkerProcess(tmp_path, env)
    worker.start()
    try:
        out = run_cli("submit", f"s3://{bucket}/in/", "--out", f"s3://{bucket}/out/",
                      "--inventory", f"s3://{bucket}/{CONFIG}/", env=env)
        assert out.returncode == 0, out.stderr
        job = out.stdout.split()[-1]
        assert run_cli("wait", job, "--timeout", "180", "--no-progress", env=env).returncode == 0
    finally:
        worker.stop()
    listed = client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]
    results = sorted(o["Key"] for o in listed if o["Key"].endswith(".jpg.json"))
    assert results == ["out/a.jpg.json", "out/b.jpg.json"]
    counts = client.get_object(Bucket=bucket, Key="out/_counts.csv")["Body"].read().decode(
        "utf-8-sig")
    assert heads["a.jpg"]["ETag"].strip('"') in counts  # the report's versions are recorded


def test_a_parquet_report_lists_the_same_objects_with_plain_keys(s3_server, bucket, tmp_path):
    """Parquet reports (AWS's column names; keys not URL-encoded there) read like CSV ones."""
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    client = s3_server.client()
    table = pa.table({
        "bucket": [bucket] * 5 + ["other"],
        "key": ["in/a+b%2Bc.jpg", "in/sub/x.jpg", "in/gone.jpg", "in/old.jpg", "out/y.jpg",
                "in/z.jpg"],
        "version_id": [None] * 6,
        "is_latest": [True, True, True, False, True, True],
        "is_delete_marker": [False, False, True, False, False, False],
        "size": pa.array([11, 12, 1, 1, 1, 1], pa.int64()),
        "last_modified_date": pa.array([datetime(2026, 12, 1, tzinfo=UTC)] * 6,
                                       pa.timestamp("ms", tz="UTC")),
        "e_tag": ["e1", "e2", "x", "x", "x", "x"],
    })
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=2)  # several groups: read a group at a time
    body = path.read_bytes()
    data_key = f"{CONFIG}/data/part.parquet"
    client.put_object(Bucket=bucket, Key=data_key, Body=body)
    manifest = {"sourceBucket": bucket, "destinationBucket": f"arn:aws:s3:::{bucket}",
                "fileFormat": "Parquet", "fileSchema": "message s3.inventory { ... }",
                "files": [{"key": data_key, "size": len(body),
                           "MD5checksum": hashlib.md5(body).hexdigest()}]}
    url = f"s3://{bucket}/{CONFIG}/2026-12-01T01-00Z/manifest.json"
    client.put_object(Bucket=bucket, Key=url.split("/", 3)[3], Body=json.dumps(manifest).encode())
    got = {(o.key, o.etag, o.size) for o in inventory_objects(url, open_storage(
        f"s3://{bucket}/in/"))}
    assert got == {("a+b%2Bc.jpg", "e1", 11), ("sub/x.jpg", "e2", 12)}
