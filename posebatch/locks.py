"""Redis locks with a token that a timer renews: a job's finalize lock, an output's tables lock.

Why apart from ``posebatch.jobstate``: a lock is a storage primitive with a thread of its own;
the store hands them out (it knows their keys and terms), the end-of-job policy
(``posebatch.jobend``) holds them. Redis errors are left to the caller's ``redis_errors``.
"""

from __future__ import annotations

import secrets
import threading

import redis

from posebatch.errors import StateUnavailable

LOCK_RENEWALS_PER_TERM = 4
"""A lock is renewed this many times per term by a timer, so a step that does not return for
minutes (downloading 4.7 GB of earlier rows, uploading the root table) never lets it lapse."""

_RENEW_IF_OWNER = redis.Redis().register_script(
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end")
_DELETE_IF_OWNER = redis.Redis().register_script(
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('del', KEYS[1]) else return 0 end")


class RenewedLock:
    """A Redis lock with a token, renewed from a thread every ``term / LOCK_RENEWALS_PER_TERM``
    seconds while held.

    Why a thread and not calls from the loop: the long steps of a finalize are single calls
    (a download or a multipart upload of a 4.7 GB table), and with renewals only every 50,000
    records the 120 s lock lapsed during them: past ~13M earlier rows another finalizer took
    over and neither reached ``done``. The timer renews whatever the step; ``check()`` (called
    by the loops) raises once a renewal found the lock taken by another. A process frozen for
    longer than the term still loses it, which is what the term is for.
    """

    def __init__(self, client: redis.Redis, key: str, term: int) -> None:
        self.r, self.key, self.term = client, key, term
        self.token = secrets.token_hex(8)
        self.renewals = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.r.set(self.key, self.token, nx=True, ex=self.term):
            return False
        self._thread = threading.Thread(target=self._keep, name="finalize-lock", daemon=True)
        self._thread.start()
        return True

    def _keep(self) -> None:
        every = self.term / LOCK_RENEWALS_PER_TERM
        while not self._stop.wait(every):
            try:
                self.renew()
            except StateUnavailable:
                return
            except redis.RedisError:  # a blip: the next tick tries again, the term is long
                continue

    def renew(self) -> None:
        """Extend the lock now; raise StateUnavailable if another finalizer holds it."""
        if self.lost or not _RENEW_IF_OWNER(keys=[self.key], args=[self.token, self.term],
                                            client=self.r):
            self.lost = True
            raise StateUnavailable(f"{self.key}: the finalize lock was lost (a pause over "
                                   f"{self.term} s?); another finalizer takes over")
        self.renewals += 1

    def check(self) -> None:
        if self.lost:
            raise StateUnavailable(f"{self.key}: the finalize lock was lost; another "
                                   "finalizer takes over")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _DELETE_IF_OWNER(keys=[self.key], args=[self.token], client=self.r)
