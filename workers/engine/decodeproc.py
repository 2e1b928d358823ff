"""Decoding in worker processes that write the model input straight into shared-memory batches.

Why processes: in the thread path every decode thread, the model's thread and the writer threads
share one GIL, and the per-image Python around libjpeg and OpenCV (validation, EXIF, letterbox
arithmetic, numpy calls) is serial: on small images a run could not even use two cores (issue 20).
Here each decode process holds its own GIL and writes the uint8 or float32 pixels into a slot of
a batch whose memory is a ``multiprocessing.shared_memory`` segment; only the encoded bytes go in
(one ``send_bytes``, a memcpy) and a few numbers come back (size, orientation scale, letterbox,
or the image's error result). No pixel is pickled.

Why fetched in the parent: the storage clients (boto3, the local folder reader) and their
connection pools live there; the bytes of a JPEG are small next to its pixels.

Why one socket per process and not ``ProcessPoolExecutor``: each process decodes its images in
the order they were sent on its own socket, so when a process dies (a decoder crash, the OOM
killer) the image it was decoding is known exactly: it is retried once on another process, and
gets an error result if that one dies too; the images queued behind it are sent again, and the
dead process is replaced. (A broken ProcessPoolExecutor fails every pending future alike.)

The same rules and error codes as the thread path: the child runs the same ``decode_image``,
``fit`` and ``write_input`` (workers.engine.pipeline.prepare), so the pixels are the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from posebatch.errors import INTERNAL_ERROR, ConfigError, ImageError
from posebatch.schema import error_result
from workers.engine.batches import Batch, BatchPool
from workers.engine.stages import perf_counter

log = logging.getLogger(__name__)

DECODE_TIMEOUT_S = 120.0
"""A decode process that has not answered for this long is killed and its image retried: a
decoder stuck in a loop must not hang the run."""
CRASH_MARK_ENV = "POSEBATCH_TEST_DECODE_CRASH"
HANG_MARK_ENV = "POSEBATCH_TEST_DECODE_HANG"
"""Fault injection for tests: a decode process aborts (or hangs) on an image whose bytes hold
this variable's value (a real decoder crash or endless loop cannot be had on demand)."""
CRASH_MESSAGE = ("internal error: the decoder process crashed (or hung) twice on this image (a "
                 "decoder bug or the machine ran out of memory); try --decode-workers 0 to "
                 "decode it in threads, and please report it")


class SharedBatchPool(BatchPool):
    """A BatchPool whose batch arrays live in shared memory, so decode processes can write
    their slots; ``segment(batch)`` names a batch's memory for them."""

    def __init__(self, size: int, dtype: type = np.float32) -> None:
        super().__init__(size, dtype)
        self._segments: dict[int, SharedMemory] = {}
        # Unlinked at exit too (a worker's engine lives as long as its process).
        weakref.finalize(self, _unlink_all, self._segments)

    def _alloc(self, hw: tuple[int, int]) -> np.ndarray:
        shape = (self.size, 3, *hw)
        nbytes = int(np.prod(shape)) * np.dtype(self.dtype).itemsize
        shm = SharedMemory(create=True, size=nbytes)
        _reserve(shm, nbytes, len(self._segments))
        array: np.ndarray = np.ndarray(shape, self.dtype, buffer=shm.buf)
        self._segments[id(array)] = shm
        return array

    def segment(self, batch: Batch) -> str:
        return self._segments[id(batch.array)].name

    def close(self) -> None:
        """Free the segments: no batch of this pool may be used afterwards."""
        with self._lock:
            self._filling.clear()
            self._free.clear()
            _unlink_all(self._segments)


def _reserve(shm: SharedMemory, nbytes: int, held: int) -> None:
    """Allocate the segment's pages now: a tmpfs that is too small (Docker's /dev/shm is 64 MB
    unless ``--shm-size`` says more) would otherwise let the segment be made and then kill the
    process that first writes past its end (SIGBUS), far from the cause."""
    fd = getattr(shm, "_fd", -1)
    if fd < 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as err:
        _close(shm, unlink=True)
        raise ConfigError(
            f"decode processes: no room for a {nbytes / 2**20:.0f} MB batch in shared memory "
            f"(/dev/shm, {held} batches held already): {err.strerror}. Give the container more "
            "(docker run --shm-size=1g, compose shm_size), use a smaller --batch-size, or "
            "decode in threads (--decode-workers 0)") from err


def _unlink_all(segments: dict[int, SharedMemory]) -> None:
    for shm in segments.values():
        _close(shm, unlink=True)
    segments.clear()


def _close(shm: SharedMemory, *, unlink: bool) -> None:
    with contextlib.suppress(BufferError):  # an array still views it: it goes with the process
        shm.close()
    if unlink:
        with contextlib.suppress(FileNotFoundError):
            shm.unlink()


# --- the child's side ------------------------------------------------------------------------

_attached: dict[str, np.ndarray] = {}


def _slot_array(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """The batch array of segment ``name``, mapped once per process and kept.

    Mapped by hand and not with ``SharedMemory(name)``: before Python 3.13 that registers the
    segment with this process's own resource tracker, which unlinks it (and warns of a leak)
    when this process exits, under the parent that owns it."""
    found = _attached.get(name)
    if found is None:
        import _posixshmem  # what SharedMemory uses on POSIX

        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            buf = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        found = _attached[name] = np.ndarray(shape, np.dtype(dtype), buffer=buf)
    return found


def decode_into(header: tuple[Any, ...], data: bytes) -> tuple[Any, ...]:
    """In a decode process: decode ``data`` and write its model input into the slot that
    ``header`` names. Returns ``("ok", width, height, sx, sy, scale, pad_x, pad_y, rgb_h, rgb_w,
    t_decode, t_resize, t_copy)`` or ``("err", error_result, t_decode, 0, 0)``."""
    from workers.engine.decode import Limits, decode_image
    from workers.engine.letterbox import fit, write_input

    name, shape, dtype, slot, hw, limits, target = header
    t0 = perf_counter()
    t1 = t2 = t0
    try:
        image = decode_image(data, Limits(*limits), target=target)
        t1 = perf_counter()
        resized, box = fit(image.rgb, hw)
        t2 = perf_counter()
        write_input(resized, box, _slot_array(name, shape, dtype)[slot])
        t3 = perf_counter()
        return ("ok", image.width, image.height, *image.scale_xy, box.scale, box.pad_x,
                box.pad_y, *image.rgb.shape[:2], t1 - t0, t2 - t1, t3 - t2)
    except ImageError as err:
        return ("err", error_result(err.code, err.message), perf_counter() - t0, 0.0, 0.0)
    except Exception as err:  # a decoder bug on one file must not take the batch down
        log.exception("unexpected error decoding in process %d", os.getpid())
        return ("err", error_result(INTERNAL_ERROR, f"internal error: {err}"),
                perf_counter() - t0, 0.0, 0.0)


def _serve(conn: Connection) -> None:
    """A decode process's loop: a header and the bytes in, the metadata out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per core already: OpenCV's own pool would oversubscribe
    except Exception:
        pass
    crash = os.environ.get(CRASH_MARK_ENV, "").encode()
    hang = os.environ.get(HANG_MARK_ENV, "").encode()
    while True:
        try:
            header = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the parent closed the pipe or died
            return
        if crash and crash in data:  # fault injection (tests): die as a decoder crash would
            os.abort()
        if hang and hang in data:
            signal.pause()
        conn.send(decode_into(header, data))


# --- the parent's side -----------------------------------------------------------------------


_LOST = ("lost",)
"""The answer of a request queued behind the image a process died on: sent again elsewhere."""
_CULPRIT = ("culprit",)
"""The answer of the request a process was decoding when it died (or hung)."""


class _Proc:
    """One decode process: ``python -m workers.engine.decodeproc FD``, a socket to it, and a
    thread that reads its answers in order.

    Why a plain subprocess and not ``multiprocessing.Process``: spawn and forkserver re-import
    the parent's ``__main__`` in the child, which fails (or runs the script again) for any
    script without an ``if __name__ == "__main__"`` guard, e.g. a user's own around the Python
    API; and fork is unsafe after threads and ONNX Runtime's pools.

    Why requests are queued (``pending``) and not sent one at a time: the answer of one image
    is read by a parent thread that first has to get the GIL (milliseconds when the model's
    thread or a writer holds it); with the next image already in the socket the process goes on
    decoding meanwhile. It decodes in order, so when it dies the oldest pending request is the
    one it died on.
    """

    def __init__(self, timeout: float, on_death: Any) -> None:
        ours, theirs = socket.socketpair()
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH"))
                                             if p)}
        self.proc = subprocess.Popen([sys.executable, "-m", "workers.engine.decodeproc",
                                      str(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, env=env, close_fds=True)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.timeout = timeout
        self.pending: deque[tuple[Future[tuple[Any, ...]], float]] = deque()
        self.dead = False
        self._lock = threading.Lock()
        self._on_death = on_death
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"decode-proc-{self.proc.pid}")
        self._reader.start()

    def submit(self, header: tuple[Any, ...], data: bytes) -> Future[tuple[Any, ...]] | None:
        """Queue one image; None when this process is already dead (pick another)."""
        fut: Future[tuple[Any, ...]] = Future()
        with self._lock:
            if self.dead:
                return None
            self.pending.append((fut, perf_counter()))
            try:
                self.conn.send(header)
                self.conn.send_bytes(data)
            except OSError:  # it died: the reader sees EOF and answers every pending request
                pass
        return fut

    def _read(self) -> None:
        why = "exited"
        while True:
            try:
                if self.conn.poll(1.0):
                    answer = self.conn.recv()
                    with self._lock:
                        fut, _sent = self.pending.popleft()
                    fut.set_result(answer)
                    continue
            except (EOFError, OSError, IndexError):
                break
            with self._lock:
                if self.dead:
                    return
                oldest = self.pending[0][1] if self.pending else None
            if oldest is not None and perf_counter() - oldest > self.timeout:
                why = f"did not answer in {self.timeout:g} s"
                break
        with self._lock:
            if self.dead:
                return  # closed by the parent
            self.dead = True
            lost = list(self.pending)
            self.pending.clear()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if lost:
            log.warning("decode process %s %s (code %s) while decoding an image; %d queued "
                        "image(s) go to another process", self.proc.pid, why,
                        self.proc.returncode, len(lost) - 1)
        self._on_death(self)  # a replacement exists before any request is sent again
        for n, (fut, _sent) in enumerate(lost):
            fut.set_result(_CULPRIT if n == 0 else _LOST)

    def load(self) -> int:
        return len(self.pending)

    def stop(self) -> None:
        with self._lock:
            self.dead = True
        with contextlib.suppress(OSError):
            self.conn.close()  # EOF: the child's loop ends
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class DecodeProcs:
    """``n`` decode processes; ``decode`` may be called from several threads at once (each
    call queues one image on the least busy process). Made once per engine, kept between runs
    and tasks."""

    def __init__(self, n: int, timeout: float | None = None) -> None:
        if n < 1:
            raise ValueError(f"expected at least 1 decode process, got {n}")
        self.n = n
        self.timeout = DECODE_TIMEOUT_S if timeout is None else timeout
        self.restarts = 0
        """Processes replaced after a crash or a hang (tests and logs read it)."""
        self._lock = threading.Lock()
        self._all: list[_Proc] = [self._new() for _ in range(n)]
        self._closed = False

    def _new(self) -> _Proc:
        return _Proc(self.timeout, self._replace)

    def pids(self) -> list[int]:
        with self._lock:
            return [p.proc.pid for p in self._all]

    def decode(self, header: tuple[Any, ...], data: bytes) -> tuple[Any, ...]:
        """One image: ``decode_into``'s answer from a process; the crash error result after two
        processes died on it. Blocks the calling thread (a fetch thread) until then."""
        deaths = 0
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the decode processes were closed")
                p = min(self._all, key=_Proc.load)
            fut = p.submit(header, data)
            if fut is None:
                continue  # it died just now: its replacement is being started
            answer = fut.result()
            if answer is _CULPRIT:
                deaths += 1
                if deaths >= 2:
                    return ("err", error_result(INTERNAL_ERROR, CRASH_MESSAGE), 0.0, 0.0, 0.0)
            elif answer is not _LOST:
                return answer

    def _replace(self, dead: _Proc) -> None:
        with self._lock:
            if self._closed or dead not in self._all:
                return
            self.restarts += 1
        fresh = self._new()
        with self._lock:
            self._all[self._all.index(dead)] = fresh

    def close(self) -> None:
        with self._lock:
            self._closed = True
            procs, self._all = self._all, []
        for p in procs:
            p.stop()


__all__ = ["CRASH_MESSAGE", "DecodeProcs", "SharedBatchPool", "decode_into"]

if __name__ == "__main__":  # a decode process (_Proc): its socket's descriptor in argv
    _serve(Connection(int(sys.argv[1])))
