"""Objects in S3 (or any S3-compatible server): the ``Storage`` of ``s3://bucket/prefix``.

Why apart from ``posebatch.storage``: boto3 and botocore take ~0.3 s to import, and a local run
(``posebatch run photos/ --out results/``) never talks to S3; ``open_storage`` imports this
module only for an ``s3://`` URL.
"""

from __future__ import annotations

import contextlib
import logging
import mimetypes
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from posebatch import s3fast
from posebatch.errors import (
    ConfigError,
    ObjectTooLarge,
    ObjectUnreadable,
    StorageError,
    StorageNotFound,
    StorageUnreachable,
)
from posebatch.settings import check_endpoint_url
from posebatch.storageapi import S3_KEY_MAX, ObjectInfo, safe_key, suffix_filter

logger = logging.getLogger(__name__)


# S3 error codes that mean the credentials themselves are wrong: every request will fail alike.
_CREDENTIAL_CODES = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                     "InvalidSecurity", "AuthorizationHeaderMalformed")


def check_s3_environment() -> None:
    """ConfigError (exit 3) naming the variable when ``AWS_ENDPOINT_URL[_S3]`` is no URL; a
    worker calls it at start-up, so it does not fail every batch for it."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            check_endpoint_url(os.environ[name], name)


S3_TIMEOUTS = {"max_attempts": 4, "connect_timeout": 5.0, "read_timeout": 60.0}
S3_POOL = 64
"""Connections a process keeps per client: a GPU worker's 16 decode and 16 writer threads
share one; past botocore's default of 10, urllib3 drops and re-opens connections."""


def make_s3_client(
    *, max_attempts: int = S3_TIMEOUTS["max_attempts"],
    connect_timeout: float = S3_TIMEOUTS["connect_timeout"],
    read_timeout: float = S3_TIMEOUTS["read_timeout"],
) -> Any:
    """A boto3 S3 client configured only the standard way (AWS_* env vars, incl. AWS_ENDPOINT_URL).

    Path-style addressing when an endpoint is configured: self-hosted servers (SeaweedFS, MinIO)
    behind a plain hostname do not resolve ``bucket.host``. Clients are thread-safe; create one per
    process (after fork), which S3Storage does lazily.
    """
    check_s3_environment()
    custom = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    config = Config(
        retries={"mode": "standard", "max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=S3_POOL,
        s3={"addressing_style": "path"} if custom else None,
    )
    return boto3.session.Session().client("s3", config=config)


def _cause(err: BaseException) -> BaseException | None:
    """What an exception wraps (boto3's S3UploadFailedError is raised inside an ``except``)."""
    return err.__cause__ or err.__context__


class S3Storage:
    """Objects below ``s3://bucket/prefix/``."""

    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, page_size: int = 1000
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.page_size = page_size
        self._client = client
        self._client_pid = os.getpid() if client is not None else None
        self._lock = threading.Lock()
        # The per-image GET and PUT go through obstore (posebatch.s3fast) unless a client was
        # handed in (tests, benches counting boto3's requests) or POSEBATCH_S3_CLIENT=boto3.
        self._fast: Any = None
        self._fast_pid: int | None = None
        self._use_fast = client is None and s3fast.wanted()

    @property
    def client(self) -> Any:
        # Lazily, and again after a fork: a client's connection pool must not cross processes.
        if self._client is None or self._client_pid != os.getpid():
            with self._lock:
                if self._client is None or self._client_pid != os.getpid():
                    self._client, self._client_pid = make_s3_client(), os.getpid()
        return self._client

    @property
    def fast(self) -> Any:
        """obstore's store for GET/PUT (None: boto3 for everything), made again after a fork."""
        if not self._use_fast:
            return None
        if self._fast is None or self._fast_pid != os.getpid():
            with self._lock:
                if self._fast is None or self._fast_pid != os.getpid():
                    check_s3_environment()
                    try:
                        self._fast = s3fast.FastS3(self.bucket, **S3_TIMEOUTS)
                    except s3fast.Unsupported:  # e.g. no credentials: boto3 reports it
                        self._use_fast = False
                        return None
                    self._fast_pid = os.getpid()
        return self._fast

    def join(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _error(self, err: Exception, op: str, key: str | None = None) -> Exception:
        """Translate a botocore error into our tree; the message names the URL, never secrets."""
        where = self.join(key) if key is not None else self.url
        if isinstance(err, S3UploadFailedError) and isinstance(_cause(err), ClientError):
            err = _cause(err)  # upload_file's wrapper: the service's answer is inside
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(err, ClientError):
            info = err.response.get("Error", {})
            code = str(info.get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "KeyTooLongError":
                return ConfigError(self._scrub(
                    f"S3 {op} {where} refused: the key is over S3's {S3_KEY_MAX} bytes; use a "
                    "shorter --out prefix"))
            if code == "NoSuchBucket":
                return StorageNotFound(
                    f"bucket {self.bucket} does not exist; create it or fix the URL ({self.url})"
                )
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                return StorageNotFound(f"{where} does not exist")
            cause = f"{code or 'error'} (HTTP {status}): {info.get('Message', '')}"
            if code in _CREDENTIAL_CODES or (code == "AccessDenied" and op == "list"):
                return ConfigError(self._scrub(
                    f"S3 {op} {where} refused: {cause}; check AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY and the permissions of that key"))
            if op in ("read", "peek") and code in ("AccessDenied", "InvalidObjectState"):
                hint = ("it is archived (Glacier / Deep Archive): restore it, then rerun"
                        if code == "InvalidObjectState" else "access denied for this object")
                return ObjectUnreadable(self._scrub(f"cannot read {where}: {hint} ({cause})"))
            outage = isinstance(status, int) and status >= 500
        else:
            cause = f"{type(err).__name__}: {err}"
            outage = True  # no answer at all: connection refused or reset, timeout
        kind = StorageUnreachable if outage else StorageError
        return kind(self._scrub(f"S3 {op} {where} failed: {cause}"))

    def _scrub(self, text: str) -> str:
        secrets = [os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN")]
        creds = getattr(getattr(self._client, "_request_signer", None), "_credentials", None)
        if creds is not None:
            secrets += [getattr(creds, "secret_key", None), getattr(creds, "token", None)]
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def iter_keys(
        self, suffixes: tuple[str, ...] | None = None, start_after: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[str]:
        """Stream keys page by page (ListObjectsV2 paginator); the listing is never held whole."""
        wanted = suffix_filter(suffixes)
        size = self.page_size if page_size is None else max(1, min(page_size, self.page_size))
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix,
            "PaginationConfig": {"PageSize": size},
        }
        if start_after:
            kwargs["StartAfter"] = self.prefix + start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][len(self.prefix) :]
                    if key and not key.endswith("/") and wanted(key):  # skip folder markers
                        yield key
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "list") from err

    def upload(self, key: str, path: str, content_type: str | None = None) -> None:
        """boto3's transfer manager: one PUT below 16 MB, a multipart upload above (parts of
        16 MB, 4 at a time): a 465 MB table never sits in memory and never needs one PUT."""
        from boto3.s3.transfer import TransferConfig

        full = self.prefix + safe_key(key)
        ctype = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        config = TransferConfig(multipart_threshold=16 * 2**20, multipart_chunksize=16 * 2**20,
                                max_concurrency=4)
        try:
            self.client.upload_file(path, self.bucket, full, ExtraArgs={"ContentType": ctype},
                                    Config=config)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "write", key) from err
        except S3UploadFailedError as err:
            if isinstance(_cause(err), ClientError):  # the service answered: what it said
                raise self._error(err, "write", key) from err
            raise StorageUnreachable(self._scrub(f"S3 write {self.join(key)} failed: {err}")) \
                from err

    def download(self, key: str, path: str) -> None:
        full = self.prefix + safe_key(key)
        try:
            self.client.download_file(self.bucket, full, path)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "read", key) from err

    def iter_objects(self, parallel: int = 1,
                     start_after: str | None = None) -> Iterator[ObjectInfo]:
        """With ``parallel`` > 1, the sub-prefixes below the root (by delimiter "/") are listed
        by that many paginators at once, in no particular order (``_parallel_objects``); with
        ``start_after``, one paginator from past that key, in key order."""
        if start_after is not None:
            yield from self._objects(self.prefix, start_after=self.prefix + start_after)
            return
        if parallel > 1:
            yield from self._parallel_objects(parallel)
            return
        yield from self._objects(self.prefix)

    def folders(self) -> list[str]:
        """The names of the sub-prefixes right below the root (``a`` for ``root/a/...``)."""
        found: list[str] = []
        for _info in self._objects(self.prefix, "/", found):
            pass
        return [f[len(self.prefix):].rstrip("/") for f in found]

    def _info(self, obj: dict[str, Any]) -> ObjectInfo | None:
        key = obj["Key"][len(self.prefix):]
        if not key or key.endswith("/"):  # the root itself, or a folder marker
            return None
        stamp = obj.get("LastModified")
        return ObjectInfo(key, str(obj.get("ETag", "")).strip('"'), int(obj.get("Size", 0)),
                          stamp.timestamp() if stamp is not None else time.time())

    def _objects(self, prefix: str, delimiter: str | None = None,
                 folders: list[str] | None = None,
                 start_after: str | None = None) -> Iterator[ObjectInfo]:
        """One paginator over ``prefix``; with ``delimiter``, sub-prefixes go to ``folders``."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix,
                                  "PaginationConfig": {"PageSize": self.page_size}}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if start_after:
            kwargs["StartAfter"] = start_after
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                for obj in page.get("Contents", ()):
                    info = self._info(obj)
                    if info is not None:
                        yield info
                if folders is not None:
                    folders.extend(cp["Prefix"] for cp in page.get("CommonPrefixes", ()))
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "list") from err

    def _parallel_objects(self, workers: int) -> Iterator[ObjectInfo]:
        """List the root by delimiter "/" (its own objects, and its sub-prefixes), descending
        one more level while there are fewer sub-prefixes than ``workers``; then one paginator
        per sub-prefix, ``workers`` at a time, pages handed over through a bounded queue.

        Why: one ListObjectsV2 stream returns ~4,000 keys/s; a 10M-key submit took ~40 min
        before the first worker could be kept busy. Memory: at most ``2 * workers`` pages of
        1000 keys waiting."""
        import queue
        from concurrent.futures import ThreadPoolExecutor

        prefixes = [self.prefix]
        for _depth in range(3):
            if len(prefixes) >= workers:
                break
            deeper: list[str] = []
            for prefix in prefixes:
                yield from self._objects(prefix, "/", deeper)
            if not deeper:
                return
            prefixes = deeper
        pages: queue.Queue[list[ObjectInfo] | BaseException | None] = queue.Queue(2 * workers)
        stop = threading.Event()

        def run(prefix: str) -> None:
            batch: list[ObjectInfo] = []
            try:
                for info in self._objects(prefix):
                    if stop.is_set():
                        return
                    batch.append(info)
                    if len(batch) >= self.page_size:
                        pages.put(batch)
                        batch = []
                pages.put(batch)
            except BaseException as err:  # handed to the consumer, raised there
                pages.put(err)

        with ThreadPoolExecutor(workers, thread_name_prefix="list") as pool:
            futures = [pool.submit(run, prefix) for prefix in prefixes]
            try:
                finished = 0
                while finished < len(futures) or not pages.empty():
                    item = pages.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield from item
                    if item is not None and len(item) < self.page_size:
                        finished += 1  # a paginator's last (short) page
            finally:
                stop.set()
                while any(not f.done() for f in futures):  # unblock producers
                    with contextlib.suppress(queue.Empty):
                        pages.get(timeout=0.1)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """One GET; its Content-Length is checked before the body is read, so an oversized
        object costs no transfer and no extra HEAD request."""
        full = self.prefix + safe_key(key)
        fast = self.fast
        if fast is not None:
            try:
                size, body = fast.get(full, max_bytes)
            except s3fast.Unsupported:
                pass  # a key obstore cannot express: boto3 below
            except Exception as err:
                raise self._error(err, "read", key) from err
            else:
                if body is None:
                    raise ObjectTooLarge(self.join(key), size, max_bytes or 0)
                return body
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full)
            size = int(response.get("ContentLength", 0))
            if max_bytes is not None and size > max_bytes:
                response["Body"].close()
                raise ObjectTooLarge(self.join(key), size, max_bytes)
            return response["Body"].read()
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "read", key) from err

    def peek(self, key: str, n: int) -> bytes:
        full = self.prefix + safe_key(key)
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=full,
                                              Range=f"bytes=0-{n - 1}")
            return response["Body"].read()[:n]
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") == "InvalidRange":  # an empty object
                return b""
            raise self._error(err, "peek", key) from err
        except BotoCoreError as err:
            raise self._error(err, "peek", key) from err

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """One PUT: S3 objects appear whole or not at all, so this is atomic already."""
        full = self.prefix + safe_key(key)
        ctype = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        fast = self.fast
        if fast is not None:
            try:
                fast.put(full, data, ctype)
                return
            except s3fast.Unsupported:
                pass  # boto3 below
            except Exception as err:
                raise self._error(err, "write", key) from err
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=ctype)
        except (ClientError, BotoCoreError) as err:
            raise self._error(err, "write", key) from err

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """A conditional PUT (``If-None-Match: *``): AWS S3 since 2024-08, SeaweedFS (4.48
        checked: one of 8 concurrent PUTs wins, the others get 412 PreconditionFailed), MinIO.
        A server that answers 501 NotImplemented gets a check-then-put instead, which two
        writers can both pass (best effort; the run re-checks the manifest at its end)."""
        full = self.prefix + safe_key(key)
        ctype = content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=ctype,
                                   IfNoneMatch="*")
            return True
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409,
                                                                                           412):
                return False  # it exists (412), or another conditional PUT is in flight (409)
            if code != "NotImplemented" and status != 501:
                raise self._error(err, "write", key) from err
        except BotoCoreError as err:
            raise self._error(err, "write", key) from err
        logger.warning("%s: the S3 server does not take conditional writes (If-None-Match); "
                       "claiming by check-then-write", self.join(key))
        if self.exists(key):
            return False
        self.write(key, data, content_type)
        return True

    def size(self, key: str) -> int | None:
        full = self.prefix + safe_key(key)
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except (ClientError, BotoCoreError) as err:
            mapped = self._error(err, "stat", key)
            if isinstance(mapped, StorageNotFound):  # HEAD cannot tell a missing bucket apart
                return None
            raise mapped from err

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def name_problem(self, key: str) -> str | None:
        size = len((self.prefix + safe_key(key)).encode("utf-8", "surrogateescape"))
        if size > S3_KEY_MAX:
            return (f"{self.join(key)}: the key is {size} bytes, and S3 allows {S3_KEY_MAX} "
                    "bytes per key (the output prefix counts too)")
        return None
