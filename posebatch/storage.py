"""One small storage interface, two real backends: a local folder and an S3 bucket/prefix.

Why so small: the producer lists images, workers read them and write JSON next to them, and the
aggregator reads results back. Seven operations cover that (``peek`` sniffs extensionless
files), and keeping both backends behind the same seven means every test of the pipeline runs
unchanged against a tmp dir or a real S3 server.
Keys are always relative to the root, "/"-separated, and listed in S3's order (by UTF-8 bytes of
the whole key) so a listing can be resumed with ``start_after`` on either backend. Resume from the
last key the listing *returned*, not from a key computed by sorting: SeaweedFS 4.x lists folder by
folder ("a/x.jpg" before "a-b.jpg"), with a StartAfter that follows its own order.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mimetypes
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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
    UnsafeKeyError,
)
from posebatch.names import display_path, key_from_name, name_from_key
from posebatch.oserrors import file_kind, read_error, write_error
from posebatch.settings import check_endpoint_url

_TMP_PREFIX = ".pbt-"
"""Partial writes in progress, never listed: ``.pbt-<16 hex>``, short whatever the final name,
so that a result name of up to 255 bytes still has a temporary name that fits (the old
``.posebatch-tmp-<name>.json.<32 hex>`` made a 203-byte image name fail)."""
_TMP_PREFIXES = (_TMP_PREFIX, ".posebatch-tmp-")  # the old prefix: leftovers of older versions
NAME_MAX = 255
"""Bytes per file name on Linux file systems (ext4, XFS, Btrfs, tmpfs); the folder's own
``pathconf`` answer wins where it has one."""
PATH_MAX = 4096
FOLDERS_KEPT = 65_536
"""Folders a LocalStorage remembers as existing (then it starts over): bounded memory for
outputs of millions of folders."""
S3_KEY_MAX = 1024
"""Bytes of UTF-8 in one S3 key (AWS's limit; SeaweedFS answers KeyTooLongError past it)."""
logger = logging.getLogger(__name__)


def _new_tmp_seed() -> str:
    return uuid.uuid4().hex[:8]


_tmp_seed = _new_tmp_seed()
_tmp_count = itertools.count()


def _reseed_tmp_names() -> None:
    global _tmp_seed, _tmp_count  # a forked worker must not repeat its parent's names
    _tmp_seed, _tmp_count = _new_tmp_seed(), itertools.count()


os.register_at_fork(after_in_child=_reseed_tmp_names)


def _tmp_name(folder: str) -> str:
    """``.pbt-`` + 16 hex: a per-process random part and a counter. Not a uuid4 per file: that
    is one getrandom() system call per result, a GIL round trip on the writer threads. Writers
    open it with O_EXCL, so even a repeat could not overwrite another writer's file."""
    return os.path.join(folder, f"{_TMP_PREFIX}{_tmp_seed}{next(_tmp_count) & 0xFFFFFFFF:08x}")


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


def _suffix_filter(suffixes: tuple[str, ...] | None) -> Callable[[str], bool]:
    """Case-insensitive extension match: drop folders hold "IMG_001.JPG" as often as ".jpg"."""
    if not suffixes:
        return lambda key: True
    low = tuple(s.lower() for s in suffixes)
    return lambda key: key.lower().endswith(low)


class LocalStorage:
    """A folder on disk; keys map to files below it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        # Keys and the URL are UTF-8-safe text (posebatch.names); only _path() is a real name.
        self.url = display_path(self.root)
        self._name_max: int | None = None
        self._folders: set[str] = set()
        """Folders this object made or found (``write`` skips their makedirs); forgotten when
        a write finds one gone."""

    def join(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{key}"

    def _path(self, key: str) -> str:
        return os.path.join(self.root, *map(name_from_key, safe_key(key).split("/")))

    def iter_keys(
        self, suffixes: tuple[str, ...] | None = None, start_after: str | None = None,
        page_size: int | None = None,
    ) -> Iterator[str]:
        if not os.path.isdir(self.root):
            raise StorageNotFound(f"folder {self.url} does not exist")
        wanted = _suffix_filter(suffixes)
        yield from (k for k in self._walk(self.root, "", start_after) if wanted(k))

    def upload(self, key: str, path: str, content_type: str | None = None) -> None:
        dest = self._path(key)
        folder = os.path.dirname(dest)
        tmp = _tmp_name(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"cannot write {dest}: {err.strerror or err}") from err

    def download(self, key: str, path: str) -> None:
        src = self._path(key)
        try:
            shutil.copyfile(src, path)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as err:
            raise StorageNotFound(f"{src} does not exist") from err
        except OSError as err:
            raise StorageError(f"cannot read {src}: {err.strerror or err}") from err

    def iter_objects(self, parallel: int = 1,
                     start_after: str | None = None) -> Iterator[ObjectInfo]:
        for key in self.iter_keys(start_after=start_after):
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:  # removed since it was listed
                continue
            yield ObjectInfo(key, f"mtime:{st.st_mtime_ns}", st.st_size,
                             max(st.st_mtime, st.st_ctime))

    def _walk(self, path: str, prefix: str, start_after: str | None,
              folders: _Folders | None = None) -> Iterator[str]:
        folders = folders or _Folders(path)
        try:
            with os.scandir(path) as it:
                # A directory sorts as "name/" so the merged order equals S3's: "a-b" < "a/x".
                # is_dir() follows a link: a link to a folder is a folder (_Folders.enter).
                entries = sorted(
                    ((key_from_name(e.name) + ("/" if _is_folder(e) else ""), e) for e in it),
                    key=lambda pair: pair[0],
                )
        except OSError as err:
            raise StorageError(f"cannot list {display_path(path)}: {err.strerror or err}") from err
        for sort_name, entry in entries:
            key = prefix + sort_name
            if sort_name.endswith("/"):
                # Skip a whole subtree when every key in it sorts before start_after.
                if (start_after is None or key > start_after or start_after.startswith(key)) \
                        and folders.enter(entry, path):
                    yield from self._walk(entry.path, key, start_after, folders)
            elif not entry.name.startswith(_TMP_PREFIXES) and (
                start_after is None or key > start_after
            ):
                yield key

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """Open without blocking (a FIFO named x.jpg would wait forever for a writer), check
        on the open file that it is a regular file within ``max_bytes``, then read it.

        Plain ``os`` calls: open, fstat, one read of the whole file (one more if it grew since
        the fstat), close. Each system call hands the GIL on, and Python's buffered file layer
        made twice as many (a second fstat, a read until an empty one): on the decode threads
        each hand-over waited for the others."""
        with self._open_regular(key) as (fd, size):
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(self.join(key), size, max_bytes)
            data = os.read(fd, size + 1)
            if len(data) > size:  # grew since the fstat: read on to the end (or the limit)
                parts = [data]
                total = len(data)
                while chunk := os.read(fd, 1 << 20):
                    parts.append(chunk)
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        break
                data = b"".join(parts)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(self.join(key), len(data), max_bytes)
        return data

    def peek(self, key: str, n: int) -> bytes:
        with self._open_regular(key) as (fd, _size):
            return os.read(fd, n)  # a regular file: short only at its end

    @contextlib.contextmanager
    def _open_regular(self, key: str) -> Iterator[tuple[int, int]]:
        """The open descriptor of a regular file and its size; OSErrors while it is used
        become the storage's errors, and it is closed after."""
        path, where = self._path(key), self.join(key)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise read_error(err, path, where) from err
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ObjectUnreadable(f"{where} is {file_kind(info.st_mode)}, not a regular "
                                       "file")
            yield fd, info.st_size
        except OSError as err:
            raise read_error(err, path, where) from err
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write via a temp file in the same folder + os.replace, so readers never see half a file.

        No fsync: atomicity against concurrent readers is what matters here, and an fsync per
        result would dominate the cost on network file systems.
        """
        path = self._path(key)
        folder = os.path.dirname(path)
        tmp = _tmp_name(folder)
        try:
            try:
                self._write_new(folder, tmp, data)
            except FileNotFoundError:  # the folder went away since this object saw it
                self._folders.discard(folder)
                self._write_new(folder, tmp, data)
            os.replace(tmp, path)
        except OSError as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if err.errno == errno.ENAMETOOLONG:  # retrying cannot help: exit 3, not 4
                raise ConfigError(f"cannot write {self.join(key)}: the name is too long for "
                                  "this file system; shorten it, or use another --out") from err
            raise write_error(err, self.join(key)) from err

    def _write_new(self, folder: str, tmp: str, data: bytes) -> None:
        """``data`` into the new file ``tmp`` of ``folder`` (made first unless known): plain
        ``os`` calls, one system call each (``read`` says why)."""
        if folder not in self._folders:
            os.makedirs(folder, exist_ok=True)
            if len(self._folders) >= FOLDERS_KEPT:
                self._folders.clear()
            self._folders.add(folder)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)

    def create(self, key: str, data: bytes, content_type: str | None = None) -> bool:
        """The temporary file is hard-linked to the name: link() fails if the name exists, and
        the name only ever shows the whole file. Where hard links are refused (some network and
        FUSE file systems) an O_EXCL create is the fallback: still one winner, but a reader
        racing the write may see it half-written (the manifest reader treats that as absent)."""
        path = self._path(key)
        folder = os.path.dirname(path)
        tmp = _tmp_name(folder)
        try:
            os.makedirs(folder, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV,
                                     errno.EMLINK):
                    raise
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return True
        except OSError as err:
            raise write_error(err, self.join(key)) from err
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return os.path.isfile(self._path(key))

    def size(self, key: str) -> int | None:
        path = self._path(key)
        try:
            return os.path.getsize(path) if os.path.isfile(path) else None
        except FileNotFoundError:  # removed between the two calls
            return None

    def name_problem(self, key: str) -> str | None:
        names = [os.fsencode(name_from_key(part)) for part in safe_key(key).split("/")]
        limit = self._folder_name_max()
        for name in names:
            if len(name) > limit:
                return (f"{self.join(key)}: the name {key_from_name(os.fsdecode(name))!r} is "
                        f"{len(name)} bytes, and this file system allows {limit} bytes per name")
        total = len(os.fsencode(self.root)) + sum(len(n) + 1 for n in names)
        if total >= PATH_MAX:
            return (f"{self.join(key)}: the path is {total} bytes, and Linux allows "
                    f"{PATH_MAX - 1}")
        return None

    def _folder_name_max(self) -> int:
        if self._name_max is None:
            folder = self.root
            while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
                folder = os.path.dirname(folder)  # the output may not exist yet
            try:
                self._name_max = int(os.pathconf(folder, "PC_NAME_MAX"))
            except (OSError, ValueError):
                self._name_max = NAME_MAX
        return self._name_max


class _Folders:
    """The rule for symbolic links to folders inside INPUT (README, Input rules), for one walk.

    A link to a folder is followed, once: every folder entered is remembered by
    (st_dev, st_ino), so two links to one folder, or a link loop, never list an image twice or
    walk forever. Not followed: a link to a folder inside INPUT (its images are listed under
    their real path already, whatever sorts first) and a link to a folder that holds the link
    itself (a loop: ``up -> ..``). A dangling link or a link loop is not a folder: it is listed
    as a file, and named like an image it gets 216200 "no image data" when read.
    A walk resumed with ``start_after`` remembers only what it entered itself, so it may list a
    folder reached by two links twice; only the output's existence check resumes, where that
    is harmless.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        info = os.stat(root)
        self.seen = {(info.st_dev, info.st_ino)}

    def enter(self, entry: os.DirEntry[str], parent: str) -> bool:
        try:
            info = entry.stat()  # follows a link
        except OSError:
            return False  # removed since it was listed
        ident = (info.st_dev, info.st_ino)
        if ident in self.seen:
            logger.info("not following %s: that folder is listed already", entry.path)
            return False
        if entry.is_symlink():
            target, here = os.path.realpath(entry.path), os.path.realpath(parent)
            if _within(target, self.root):
                logger.info("not following %s: it points inside INPUT (%s), whose images are "
                            "listed under their own path", entry.path, target)
                return False
            if _within(here, target):
                logger.info("not following %s: a loop (it points to %s, which holds it)",
                            entry.path, target)
                return False
        self.seen.add(ident)
        return True


def _is_folder(entry: os.DirEntry[str]) -> bool:
    """A folder, or a link to one; a link loop (ELOOP) or a dangling link is not."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
        wanted = _suffix_filter(suffixes)
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


def open_storage(url: str, *, s3_client: Any = None) -> Storage:
    """``s3://bucket[/prefix]`` -> S3Storage; a path or ``file://`` path -> LocalStorage."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"storage URL {url!r} names no bucket; expected s3://bucket/prefix")
        return S3Storage(bucket, prefix, client=s3_client)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if not url:
        raise ConfigError("empty storage URL; expected s3://bucket/prefix or a folder path")
    return LocalStorage(url)
