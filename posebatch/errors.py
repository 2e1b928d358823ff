"""One exception tree for the whole project.

Why a tree: the Celery task and the local runner must decide the same way whether a failure is
worth retrying (storage hiccup, broker blip) or permanent (bad image, bad model file). Code that
raises picks the branch; code that catches only asks ``isinstance(err, RetryableError)``.
"""

from __future__ import annotations

# Error codes of the original API (SPEC, "Input rules"); clients already handle them.
EMPTY_IMAGE = 216200
BAD_FORMAT = 216201
BAD_SIZE = 216202
BAD_BASE64 = 216203
INTERNAL_ERROR = 282000
UNREADABLE_PREFIX = "no image data: "
"""Starts the message of a 216200 result whose file could not be read (as opposed to an empty
file): the next run retries those, since permissions or an archive may have been fixed."""
NAME_TOO_LONG_PREFIX = "no result can be written: "
"""Starts the message of a 282000 result whose ``<image>.json`` the output cannot hold (a file
name over 255 bytes, an S3 key over 1024). Recorded in the job's tables only: the file itself
cannot exist."""


class PosebatchError(Exception):
    """Base class of every error this project raises on purpose."""


class PermanentError(PosebatchError):
    """Retrying will not help: the input or the configuration is wrong."""


class RetryableError(PosebatchError):
    """A transient failure (network, storage, broker); the same call may succeed later."""


class ImageError(PermanentError):
    """An image was rejected by the input rules; carries the API error code for its result."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ModelError(PermanentError):
    """The ONNX model is missing, unreadable or has a layout we do not understand."""


class ConfigError(PermanentError):
    """A setting is invalid; the message says which and what is expected."""


class StorageError(RetryableError):
    """Reading or writing storage failed for a reason that may go away (timeouts, 5xx)."""


class StorageUnreachable(StorageError):
    """The storage service is not answering (connection refused or reset, timeouts, HTTP 5xx):
    an outage. Cluster batches wait it out for ``POSEBATCH_STORAGE_PATIENCE`` seconds."""


class StorageNotFound(PermanentError):
    """The object or folder does not exist."""


class ObjectUnreadable(PermanentError):
    """One object exists but cannot be read, and rereading will not help: permission denied, an
    archived S3 object, a FIFO or device named like an image, a dangling symlink. That image gets
    an error result; the job goes on."""


class ObjectTooLarge(PermanentError):
    """An object is larger than the caller's limit; found before its bytes were read."""

    def __init__(self, where: str, size: int, limit: int) -> None:
        super().__init__(f"{where} is {size} bytes; the limit is {limit} bytes")
        self.size = size
        self.limit = limit


class UnsafeKeyError(PermanentError):
    """A key would escape the output prefix (``..``, absolute paths); refused."""


class StateUnavailable(RetryableError):
    """The Redis holding job state (and usually the broker) cannot be reached right now."""


class StateFull(StateUnavailable):
    """Redis reached maxmemory (noeviction) and refuses writes until memory is freed."""


class BrokerUnavailable(RetryableError):
    """The Celery broker refused or dropped a connection while sending tasks."""


class StateAuthError(ConfigError):
    """Redis refused the credentials: the password in the broker/state URL is wrong."""
