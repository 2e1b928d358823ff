"""JPEG pixels decoded by NVIDIA nvImageCodec: on the GPU (nvJPEG, the hardware decoder where
the GPU has one) when the model runs there, else on its CPU backend (a dry run of the same path).

Why only the pixels: every input rule (format, byte size, side lengths, EXIF orientation) is
still checked on the header by ``decode.decode_image``, so both paths accept and refuse the same
files with the same codes. What this decoder does not take goes through the CPU path: anything
but an RGB or grayscale JPEG (PNG, BMP, CMYK), a file without its end marker (truncated: the CPU
path refuses it with its own message), and any file nvImageCodec cannot decode.

What differs from the CPU path: the image is decoded at full size (libjpeg-turbo decodes at a
1/2 or 1/4 DCT scale where the model input is that much smaller), so the letterbox shrinks more
and pixels move slightly (the dev set's AP is checked in tests/test_nvdecode.py); and corrupt
entropy-coded data inside a complete file is decoded as nvJPEG decodes it, where libjpeg-turbo's
strict mode refuses some of it (checking that on the CPU costs as much as decoding there, which
would undo the offload; JPEG has no checksum either way). ``--decode cpu`` keeps the strict path.

One ``Decoder`` per decode thread: its state (CUDA streams, host buffers) is not shared.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import numpy as np

from posebatch.errors import ConfigError
from posebatch.settings import DECODES

log = logging.getLogger(__name__)

INSTALL_HINT = ("pip install 'posebatch[gpu-decode]' (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg), "
                "or use --decode cpu")


def _module() -> Any:
    # Its own log would print every refused file to stderr; the CPU path reports those itself.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")
    from nvidia import nvimgcodec  # type: ignore[import-not-found]

    return nvimgcodec


def available() -> bool:
    """nvImageCodec imports (it needs no GPU to import, nor for its CPU backend)."""
    try:
        _module()
    except (ImportError, OSError):
        return False
    return True


def open_decoder(decode: str, on_cuda: bool) -> NvJpegDecoder | None:
    """The JPEG decoder for ``--decode`` (None: the CPU decodes), started now so that a GPU
    nvImageCodec cannot use (a CUDA 12 driver under the cu13 wheels, no device) shows at
    start-up: an error for ``gpu``, a warning and the CPU decoder for ``auto``."""
    if resolve(decode, on_cuda) != "gpu":
        return None
    try:
        return NvJpegDecoder("cuda" if on_cuda else "cpu")
    except Exception as err:
        if decode == "gpu":
            raise ConfigError(f"--decode gpu: nvImageCodec did not start ({err}); use "
                              "--decode cpu") from err
        log.warning("--decode auto: nvImageCodec did not start (%s); decoding on the CPU", err)
        return None


def resolve(decode: str, on_cuda: bool) -> str:
    """``cpu`` or ``gpu`` for ``--decode``; ConfigError when gpu is asked for and cannot be."""
    if decode not in DECODES:
        raise ConfigError(f"decode: expected auto, cpu or gpu, got {decode!r}")
    if decode == "auto":
        return "gpu" if on_cuda and available() else "cpu"
    if decode == "gpu" and not available():
        raise ConfigError(f"--decode gpu needs nvImageCodec, which is not installed: "
                          f"{INSTALL_HINT}")
    return decode


class NvJpegDecoder:
    """``decode(data) -> (h, w, 3) uint8`` host array, or None for the CPU path to take over.

    ``device``: ``cuda`` decodes on GPU 0 (any of nvImageCodec's backends, the hardware decoder
    first), ``cpu`` on its CPU backend only.
    """

    def __init__(self, device: str = "cuda", device_id: int = 0) -> None:
        self._nv = _module()
        self.device = device
        self._device_id = device_id
        self._local = threading.local()
        self.fallbacks = 0
        """Complete JPEGs it could not decode (the CPU path took them): a GPU that fails every
        image shows here and in the log, instead of silently running at CPU speed."""
        nv = self._nv
        self._params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.SRGB,
                                       sample_format=nv.I_RGB)
        self._decoder()  # this thread's: fails here, at start-up, if it cannot start at all

    def _decoder(self) -> Any:
        found = getattr(self._local, "decoder", None)
        if found is None:
            nv = self._nv
            if self.device == "cuda":
                found = nv.Decoder(device_id=self._device_id, max_num_cpu_threads=1)
            else:
                found = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                                   backends=[nv.Backend(nv.CPU_ONLY)], max_num_cpu_threads=1)
            self._local.decoder = found
        return found

    def decode(self, data: bytes) -> np.ndarray | None:
        """The pixels as stored (EXIF orientation is applied by the caller, as on the CPU path),
        or None: not a complete JPEG, or nvImageCodec could not decode it."""
        if not data.rstrip(b"\0").endswith(b"\xff\xd9"):
            return None  # no end marker: truncated, or data after it; the CPU path decides
        try:
            image = self._decoder().decode(data, params=self._params)
        except Exception:  # whatever it raises: the CPU decoder has the last word
            image = None
        if image is None:
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("nvImageCodec (%s) could not decode a JPEG; it and any other it "
                            "refuses go through the CPU decoder", self.device)
            return None
        if image.buffer_kind != self._nv.ImageBufferKind.STRIDED_HOST:
            image = image.cpu()  # decoded on the GPU: the letterbox runs on the host
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            return None
        return arr
