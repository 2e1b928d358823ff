"""What an OS error on one local file means for a job: that file's problem, or the storage's.

Why it matters: ``permission denied`` on one photo must give that photo an error result while the
job goes on, whereas a network file system that times out is worth a retry, and an output path
blocked by a file needs the user (exit 3), not a retry (exit 4).
"""

from __future__ import annotations

import errno
import os
import stat

from posebatch.errors import ConfigError, ObjectUnreadable, StorageError, StorageNotFound
from posebatch.names import display_path

# Errors of one file that a retry cannot fix; anything else (a network file system timing out)
# is a StorageError, retried.
_FILE_ERRNOS = {errno.EACCES, errno.EPERM, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EIO,
                errno.ENAMETOOLONG, errno.EINVAL, errno.ENODEV, errno.EOVERFLOW}


def read_error(err: OSError, path: str, where: str) -> Exception:
    """``path``: the real name (to inspect a dangling link); ``where``: the name for messages."""
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        if os.path.islink(path):
            target = display_path(os.readlink(path))
            return ObjectUnreadable(f"{where} is a symbolic link to {target}, which does not exist")
        return StorageNotFound(f"{where} does not exist")
    if err.errno in (errno.EACCES, errno.EPERM):
        return ObjectUnreadable(f"cannot read {where}: permission denied")
    if err.errno == errno.ELOOP:
        return ObjectUnreadable(f"cannot read {where}: symbolic link loop")
    if err.errno in _FILE_ERRNOS:
        return ObjectUnreadable(f"cannot read {where}: {err.strerror or err}")
    return StorageError(f"cannot read {where}: {err.strerror or err}")


def write_error(err: OSError, where: str) -> Exception:
    """A path blocked by a file, or no permission: the user must fix the output, retrying is no
    use (exit 3, not 4); anything else (disk full, I/O) may pass."""
    if err.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                     errno.EROFS):
        return ConfigError(f"cannot write {where}: {err.strerror or err}; check the output path "
                           "and its permissions")
    return StorageError(f"cannot write {where}: {err.strerror or err}")


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"
