"""One small storage interface, two real backends: a local folder (here) and an S3 bucket/prefix
(``posebatch.s3storage``, imported only for an ``s3://`` URL).

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
import os
import shutil
import stat
import uuid
from collections.abc import Iterator
from typing import Any

from posebatch.errors import (
    ConfigError,
    ObjectTooLarge,
    ObjectUnreadable,
    StorageError,
    StorageNotFound,
)
from posebatch.names import display_path, key_from_name, name_from_key
from posebatch.oserrors import file_kind, read_error, write_error
from posebatch.storageapi import ObjectInfo, Storage, safe_key, suffix_filter

__all__ = ["LocalStorage", "ObjectInfo", "Storage", "open_storage", "safe_key"]

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
        wanted = suffix_filter(suffixes)
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


def open_storage(url: str, *, s3_client: Any = None) -> Storage:
    """``s3://bucket[/prefix]`` -> S3Storage; a path or ``file://`` path -> LocalStorage."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://") :].partition("/")
        if not bucket:
            raise ConfigError(f"storage URL {url!r} names no bucket; expected s3://bucket/prefix")
        from posebatch.s3storage import S3Storage

        return S3Storage(bucket, prefix, client=s3_client)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if not url:
        raise ConfigError("empty storage URL; expected s3://bucket/prefix or a folder path")
    return LocalStorage(url)
