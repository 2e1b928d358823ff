"""The storage interface both backends implement, and the key rules they share.

Why its own module: ``posebatch.storage`` (local folders, ``open_storage``) and
``posebatch.s3storage`` (boto3, loaded only for ``s3://``) both need these, and neither should
import the other's module to get them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from posebatch.errors import UnsafeKeyError

S3_KEY_MAX = 1024
"""Bytes of UTF-8 in one S3 key (AWS's limit; SeaweedFS answers KeyTooLongError past it)."""


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object. ``etag``: S3's ETag without quotes; a folder's ``mtime:<ns>``."""

    key: str
    etag: str
    size: int
    changed: float
    """When it last changed (seconds since the epoch): LastModified, or a file's mtime/ctime."""

    @property
    def version(self) -> str:
        """What a watcher records per object (kept as it was: watchers have these on record)."""
        if self.etag.startswith("mtime:"):
            return f"{self.size}:{self.etag[len('mtime:'):]}"
        return f'"{self.etag}":{self.size}'


class Storage(Protocol):
    """What the producer, workers and aggregator need; keys are relative to ``url``."""

    url: str  # "s3://bucket/prefix/" or "/abs/path", for messages and job records

    def iter_keys(
        self, suffixes: tuple[str, ...] | None = None, start_after: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[str]:
        """All keys below the root, recursively, streamed; ``suffixes`` match case-insensitively.
        ``page_size`` (S3: MaxKeys) sizes each LIST to what the caller will look at: a check of
        32 keys parses a 70-key page, not a 1000-key one (12 ms instead of 158 ms)."""
        ...

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The object's bytes; StorageNotFound if it is missing, ObjectUnreadable if it cannot be
        read for a reason of its own, ObjectTooLarge (before reading) if over ``max_bytes``."""
        ...

    def peek(self, key: str, n: int) -> bytes:
        """The object's first ``n`` bytes (fewer if it is shorter): sniffs extensionless files."""
        ...

    def upload(self, key: str, path: str, content_type: str | None = None) -> None:
        """Create or replace ``key`` from a local file, atomically, without reading it whole
        (S3: multipart upload in parts of 16 MB)."""
        ...

    def download(self, key: str, path: str) -> None:
        """Copy ``key`` to a local file without holding it in memory; StorageNotFound if
        missing."""
        ...

    def iter_objects(self, parallel: int = 1,
                     start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Every object with its ETag, size, version and change time, streamed from the listing
        itself (no HEAD): what a rerun compares with the count table to find images replaced
        since, and what a drop folder watches (``version`` changes when an object is replaced;
        ``changed``: S3 LastModified, a file's later mtime/ctime, so a file moved in with an old
        mtime still counts as new). With ``parallel`` > 1 (S3), sub-prefixes are listed
        concurrently, in no particular order."""
        ...

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Create or replace atomically: readers see the old object or the new one, never half."""
        ...

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """Write ``key`` only if it does not exist yet, atomically (readers never see half of
        it): True if this call created it, False if it was there. How two runs claim one output
        (``posebatch.manifest``): exactly one of them creates its manifest."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int | None:
        """Size in bytes, None if missing: lets the input rules reject 40 MB files unread."""
        ...

    def name_problem(self, key: str) -> str | None:
        """Why an object named ``key`` can never be written here (a file name over the file
        system's 255 bytes, an S3 key over 1024 bytes), or None: lets a batch give that one
        image an error result instead of failing on the write."""
        ...

    def join(self, key: str) -> str:
        """Full URL or path of ``key``, for messages."""
        ...


def safe_key(key: str) -> str:
    """Return ``key`` normalised ("./" segments dropped) or raise UnsafeKeyError.

    Keys come from listings and job files we do not control; one like ``../../etc/x`` must never
    write outside the output root, on disk or (by confusing prefixes) in a bucket.
    """
    if not isinstance(key, str) or key == "":
        raise UnsafeKeyError(f"unsafe key {key!r}: keys must be non-empty strings")
    if "\x00" in key:
        raise UnsafeKeyError(f"unsafe key {key!r}: contains a NUL character")
    if key.startswith("/"):
        raise UnsafeKeyError(f"unsafe key {key!r}: absolute paths are refused, use relative keys")
    parts = [p for p in key.split("/") if p != "."]
    if "" in parts:
        raise UnsafeKeyError(f"unsafe key {key!r}: empty path segment ('//' or trailing '/')")
    if ".." in parts:
        raise UnsafeKeyError(f"unsafe key {key!r}: '..' segments could escape the storage root")
    if not parts:
        raise UnsafeKeyError(f"unsafe key {key!r}: names no object")
    return "/".join(parts)


def suffix_filter(suffixes: tuple[str, ...] | None) -> Callable[[str], bool]:
    """Case-insensitive extension match: drop folders hold "IMG_001.JPG" as often as ".jpg"."""
    if not suffixes:
        return lambda key: True
    low = tuple(s.lower() for s in suffixes)
    return lambda key: key.lower().endswith(low)
