"""Putting the source images beside an export: a symlink, a copy, or a download from S3.

Why threads and a window: an S3 input means one GET per image; a few in flight hide the latency,
and a bounded window keeps a million-image export from queueing a million downloads.
"""

from __future__ import annotations

import os
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from posebatch.errors import ConfigError
from posebatch.storage import LocalStorage, Storage

MODES = ("link", "copy", "none")


class ImagePlacer:
    """Places ``key`` of ``src`` at a path: ``link`` (local inputs only), ``copy`` or ``none``.

    An S3 input is always downloaded (``link`` means ``copy`` there): tools need local files.
    """

    def __init__(self, src: Storage | None, mode: str, threads: int = 8) -> None:
        if mode not in MODES:
            raise ValueError(f"image mode {mode!r}; expected one of {MODES}")
        self.src = src
        self.mode = mode if src is not None else "none"
        self.local = isinstance(src, LocalStorage)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="images")
        self._window: deque[Future[None]] = deque()
        self._limit = threads * 4
        self.placed = 0

    def place(self, key: str, path: Path) -> None:
        if self.mode == "none":
            return
        self._window.append(self._pool.submit(self._place, key, path))
        while len(self._window) >= self._limit:
            self._window.popleft().result()

    def _place(self, key: str, path: Path) -> None:
        assert self.src is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        if self.local and not os.path.isfile(self.src.join(key)):
            raise ConfigError(f"image {self.src.join(key)} is gone (the job's input moved?); "
                              f"export with --no-images to write the annotations only")
        if self.local and self.mode == "link":
            os.symlink(self.src.join(key), path)
        elif self.local:
            shutil.copyfile(self.src.join(key), path)
        else:
            path.write_bytes(self.src.read(key))
        self.placed += 1

    def close(self) -> None:
        try:
            while self._window:
                self._window.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
