"""S3 Inventory as the listing of a very large INPUT: one daily report instead of 100,000 LISTs.

Why: listing 100M keys is 100,000 ListObjectsV2 calls (hours from one stream, still tens of
minutes from eight); S3 writes the same list, with every object's ETag and size, once a day
into a bucket of your choice. ``posebatch submit INPUT --inventory URL`` takes the objects of
INPUT from that report instead of listing, and everything after is the same as a listed submit:
include/exclude, the rerun plan (only new, replaced or retryable keys are queued), the job's
``_inputs.csv`` with each image's version.

What is read (the format AWS documents for an inventory configuration):

- ``URL`` is a ``manifest.json``, or the configuration's folder
  (``s3://dest/prefix/source-bucket/config-id/``), whose latest dated folder
  (``YYYY-MM-DDTHH-MMZ/``) holding a ``manifest.json`` is taken;
- the manifest's ``files`` (gzipped CSV without a header, columns as ``fileSchema`` says) are
  fetched from the destination bucket and checked against their ``MD5checksum``: a truncated or
  replaced file would silently drop images, so it stops the submit instead;
- rows of other buckets or outside INPUT's prefix, delete markers and non-current versions are
  skipped; CSV keys are URL-encoded by S3 and decoded here.

Parquet reports are read with pyarrow (``pip install 'posebatch[inventory]'``), column by
column, a row group at a time; ORC is refused with a message (configure CSV or Parquet).
Objects uploaded after the report are not in it: the next day's report (or ``posebatch watch``)
has them.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

from posebatch.errors import ConfigError, StorageNotFound
from posebatch.s3storage import S3Storage
from posebatch.storage import ObjectInfo, Storage, open_storage

MANIFEST = "manifest.json"
DATED = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}-\d{2}Z$")
"""The folder S3 writes each report into."""
NEEDED = ("Bucket", "Key")
FORMATS = ("CSV", "PARQUET")
PARQUET_COLUMNS = {"Bucket": "bucket", "Key": "key", "Size": "size", "ETag": "e_tag",
                   "LastModifiedDate": "last_modified_date", "IsLatest": "is_latest",
                   "IsDeleteMarker": "is_delete_marker"}
"""The CSV schema's names and the Parquet report's columns (AWS's documented message schema)."""


def latest_manifest(url: str) -> str:
    """``url`` itself when it names a manifest; else the newest dated report below it."""
    if url.rstrip("/").endswith(MANIFEST):
        return url.rstrip("/")
    folder = open_storage(url)
    if not isinstance(folder, S3Storage):
        raise ConfigError(f"--inventory {url}: expected an s3:// URL of a manifest.json or of "
                          "an inventory configuration's folder")
    dated = sorted((f for f in folder.folders() if DATED.match(f)), reverse=True)
    for name in dated:
        if folder.exists(f"{name}/{MANIFEST}"):
            return folder.join(f"{name}/{MANIFEST}")
    raise ConfigError(f"--inventory {url}: no report found (no YYYY-MM-DDTHH-MMZ/{MANIFEST} "
                      "below it); is the inventory configuration's first report written yet?")


def read_manifest(url: str) -> tuple[dict[str, Any], Storage]:
    """The manifest, and the destination bucket its files' keys are relative to."""
    if not url.startswith("s3://"):
        raise ConfigError(f"--inventory {url}: expected an s3:// URL")
    bucket = url[len("s3://"):].partition("/")[0]
    folder, _, name = url.rpartition("/")
    try:
        manifest = json.loads(open_storage(folder).read(name))
    except StorageNotFound as err:
        raise ConfigError(f"--inventory {url} does not exist") from err
    except ValueError as err:
        raise ConfigError(f"--inventory {url} is not a JSON manifest: {err}") from err
    fmt = str(manifest.get("fileFormat", "")).upper()
    if fmt not in FORMATS:
        raise ConfigError(f"--inventory {url}: fileFormat {fmt or '(none)'} is not read here; "
                          "configure the inventory as CSV or Parquet")
    dest = str(manifest.get("destinationBucket", "")).rpartition(":::")[2] or bucket
    return manifest, open_storage(f"s3://{dest}/")


def schema(manifest: dict[str, Any]) -> dict[str, int]:
    columns = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",")]
    missing = [c for c in NEEDED if c not in columns]
    if missing:
        raise ConfigError(f"the inventory's fileSchema {manifest.get('fileSchema')!r} lacks "
                          f"{', '.join(missing)}")
    return {c: i for i, c in enumerate(columns)}


def inventory_objects(url: str, src: Storage) -> Iterator[ObjectInfo]:
    """The objects of ``src`` (an S3 INPUT) that the inventory report at ``url`` lists."""
    if not isinstance(src, S3Storage):
        raise ConfigError("--inventory lists an S3 bucket: INPUT must be s3://bucket/prefix")
    manifest_url = latest_manifest(url)
    manifest, dest = read_manifest(manifest_url)
    if manifest.get("sourceBucket") not in (None, src.bucket):
        raise ConfigError(f"--inventory {manifest_url} lists bucket {manifest['sourceBucket']}, "
                          f"not INPUT's bucket {src.bucket}")
    parquet = str(manifest.get("fileFormat", "")).upper() == "PARQUET"
    if parquet:
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError as err:
            raise ConfigError("a Parquet inventory needs pyarrow: pip install "
                              "'posebatch[inventory]' (or configure the inventory as CSV)") from err
    col = None if parquet else schema(manifest)
    for entry in manifest.get("files", []):
        with tempfile.TemporaryDirectory(prefix="posebatch-inventory-") as tmp:
            path = Path(tmp) / "part"
            dest.download(entry["key"], str(path))
            _check(path, entry, dest)
            if parquet:
                yield from _rows(_parquet_rows(path), _PARQUET_INDEX, src, encoded=False)
                continue
            with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
                yield from _rows(csv.reader(f), col, src)  # type: ignore[arg-type]


_PARQUET_INDEX = {name: i for i, name in enumerate(PARQUET_COLUMNS)}


def _parquet_rows(path: Path) -> Iterator[list[str]]:
    """A Parquet report's rows as the CSV reader gives them (``PARQUET_COLUMNS`` order,
    strings), a row group at a time: memory bounded by one group whatever the report's size."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    present = [c for c in PARQUET_COLUMNS.values() if c in f.schema_arrow.names]
    for missing in ("bucket", "key"):
        if missing not in present:
            raise ConfigError(f"the Parquet inventory {path.name} has no {missing!r} column")
    for batch in f.iter_batches(columns=present):
        data = batch.to_pydict()
        n = batch.num_rows
        columns = [data.get(c, [None] * n) for c in PARQUET_COLUMNS.values()]
        for values in zip(*columns, strict=True):
            yield [_text(v) for v in values]


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def _check(path: Path, entry: dict[str, Any], dest: Storage) -> None:
    want = entry.get("MD5checksum")
    if want is None:
        return
    with open(path, "rb") as f:
        md5 = hashlib.file_digest(f, lambda: hashlib.md5(usedforsecurity=False))
    if md5.hexdigest() != want:
        raise ConfigError(f"inventory file {dest.join(entry['key'])} does not match its "
                          f"MD5checksum in the manifest (truncated or replaced?); images "
                          "would be missed: wait for the next report, or list instead")


def _rows(reader: Iterator[list[str]], col: dict[str, int], src: S3Storage,
          encoded: bool = True) -> Iterator[ObjectInfo]:
    """Objects of ``src`` from report rows (``col``: column positions by the CSV schema's
    names); ``encoded``: keys URL-encoded, as S3 writes them in CSV (not in Parquet)."""
    get = {name: col.get(name) for name in ("Size", "ETag", "LastModifiedDate", "IsLatest",
                                             "IsDeleteMarker")}

    def field(row: list[str], name: str) -> str:
        i = get[name]
        return row[i] if i is not None and i < len(row) else ""

    for row in reader:
        if not row or row[col["Bucket"]] != src.bucket:
            continue
        if field(row, "IsDeleteMarker").lower() == "true" or \
                field(row, "IsLatest").lower() == "false":
            continue
        key = unquote_plus(row[col["Key"]]) if encoded else row[col["Key"]]
        if not key.startswith(src.prefix) or key.endswith("/"):
            continue
        size = field(row, "Size")
        yield ObjectInfo(key[len(src.prefix):], field(row, "ETag").strip('"'),
                         int(size) if size.isdigit() else 0, _stamp(field(row, "LastModifiedDate")))


def _stamp(text: str) -> float:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def as_csv_gz(rows: list[list[str]]) -> bytes:
    """An inventory data file's bytes (gzipped CSV, no header): for tests and benches."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return gzip.compress(buf.getvalue().encode())
