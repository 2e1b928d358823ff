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

Why one pipe per process and not ``ProcessPoolExecutor``: each process decodes one image at a
time on its own pipe, so when a process dies (a decoder crash, the OOM killer) the image it was
decoding is known exactly: it is retried once on a fresh process, and gets an error result if
that one dies too; the other images are not touched, and the dead process is replaced.

The same rules and error codes as the thread path: the child runs the same ``decode_image``,
``fit`` and ``write_input`` (workers.engine.pipeline.prepare), so the pixels are the same bytes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import weakref
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

from posebatch.errors import INTERNAL_ERROR, ImageError
from posebatch.schema import error_result
from workers.engine.batches import Batch, BatchPool
from workers.engine.stages import perf_counter

log = logging.getLogger(__name__)

DECODE_TIMEOUT_S = 120.0
"""A decode process that has not answered for this long is killed and its image retried: a
decoder stuck in a loop must not hang the run."""
CRASH_MARK_ENV = "POSEBATCH_TEST_DECODE_CRASH"
"""Fault injection for tests: a decode process aborts on an image whose bytes hold this value
(a real decoder crash cannot be had on demand)."""
CRASH_MESSAGE = ("internal error: the decoder process crashed twice on this image (a decoder "
                 "bug or the machine ran out of memory); try --decode-workers 0 to decode it "
                 "in threads, and please report it")


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
    while True:
        try:
            header = conn.recv()
            data = conn.recv_bytes()
        except (EOFError, OSError):  # the parent closed the pipe or died
            return
        if crash and crash in data:  # fault injection (tests): die as a decoder crash would
            os.abort()
        conn.send(decode_into(header, data))


# --- the parent's side -----------------------------------------------------------------------


class _Proc:
    """One decode process: ``python -m workers.engine.decodeproc FD``, a socket to it.

    Why a plain subprocess and not ``multiprocessing.Process``: spawn and forkserver re-import
    the parent's ``__main__`` in the child, which fails (or runs the script again) for any
    script without an ``if __name__ == "__main__"`` guard, e.g. a user's own around the Python
    API; and fork is unsafe after threads and ONNX Runtime's pools."""

    def __init__(self) -> None:
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

    def ask(self, header: tuple[Any, ...], data: bytes, timeout: float) -> tuple[Any, ...]:
        """Raises ``EOFError``/``OSError`` when the process died, ``TimeoutError`` when it hangs."""
        self.conn.send(header)
        self.conn.send_bytes(data)
        if not self.conn.poll(timeout):
            raise TimeoutError(f"decode process {self.proc.pid} did not answer in {timeout:g} s")
        return self.conn.recv()

    def stop(self, *, kill: bool = False) -> None:
        if kill and self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(OSError):
            self.conn.close()  # EOF: the child's loop ends
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


class DecodeProcs:
    """``n`` decode processes; ``decode`` may be called from several threads at once (each call
    takes an idle process for one image). Made once per engine, kept between runs and tasks."""

    def __init__(self, n: int, timeout: float = DECODE_TIMEOUT_S) -> None:
        if n < 1:
            raise ValueError(f"expected at least 1 decode process, got {n}")
        self.n = n
        self.timeout = timeout
        self.restarts = 0
        """Processes replaced after a crash or a hang (tests and logs read it)."""
        self._idle: queue.SimpleQueue[_Proc] = queue.SimpleQueue()
        self._all: list[_Proc] = []
        self._lock = threading.Lock()
        for _ in range(n):
            self._idle.put(self._add())

    def _add(self) -> _Proc:
        p = _Proc()
        with self._lock:
            self._all.append(p)
        return p

    def pids(self) -> list[int]:
        with self._lock:
            return [p.proc.pid for p in self._all]

    def decode(self, header: tuple[Any, ...], data: bytes) -> tuple[Any, ...]:
        """One image: ``decode_into``'s answer from a process, the crash error result after
        two processes died on it."""
        for attempt in (1, 2):
            p = self._idle.get()
            try:
                answer = p.ask(header, data, self.timeout)
            except (EOFError, OSError, TimeoutError) as err:
                log.warning("decode process %s failed on an image (attempt %d): %s; replacing "
                            "it", p.proc.pid, attempt, err or type(err).__name__)
                self._replace(p)
                continue
            self._idle.put(p)
            return answer
        return ("err", error_result(INTERNAL_ERROR, CRASH_MESSAGE), 0.0, 0.0, 0.0)

    def _replace(self, dead: _Proc) -> None:
        dead.stop(kill=True)
        with self._lock:
            if dead in self._all:
                self._all.remove(dead)
            self.restarts += 1
        self._idle.put(self._add())

    def close(self) -> None:
        with self._lock:
            procs, self._all = self._all, []
        for p in procs:
            p.stop()


__all__ = ["CRASH_MESSAGE", "DecodeProcs", "SharedBatchPool", "decode_into"]

if __name__ == "__main__":  # a decode process (_Proc): its socket's descriptor in argv
    _serve(Connection(int(sys.argv[1])))
