"""SimCC heads (RTMPose-style top-down models): layout of the graph and decoding of its outputs.

A SimCC model takes person crops ``(B, 3, H, W)`` (mean/std normalised RGB, e.g. 256x192 or
384x288) and classifies each keypoint's x and y separately over ``W * r`` and ``H * r`` bins
(``r`` the split ratio, 2.0 in RTMPose): outputs ``simcc_x (B, K, W*r)`` and ``simcc_y (B, K,
H*r)``. Decoding is an argmax per axis; the score is the lower of the two maxima, as in MMPose.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from posebatch.errors import ModelError

log = logging.getLogger(__name__)

# MMPose's ImageNet normalisation for RTMPose, on RGB 0..255 (its data preprocessor converts BGR
# to RGB first; the exported graph expects what the preprocessor produced).
MEAN_RGB = np.array([123.675, 116.28, 103.53], dtype=np.float32)
STD_RGB = np.array([58.395, 57.12, 57.375], dtype=np.float32)


@dataclass(frozen=True)
class SimccLayout:
    """Which output is which, and the crop geometry the graph fixes."""

    input_name: str
    input_hw: tuple[int, int]
    x_output: int
    y_output: int
    split_ratio: float
    num_keypoints: int


def detect_simcc(input_name: str, input_shape: list, outputs: list[tuple[str, list]]
                 ) -> SimccLayout | None:
    """The SimCC layout when the graph is one: one image input with fixed H, W and two rank-3
    outputs ``(B, K, W*r)``, ``(B, K, H*r)`` with the same ``K`` and the same ratio ``r``.

    Which output is x: by name (``simcc_x`` / ``simcc_y``) when named so, else the one whose
    length over W equals the other's over H. None when the graph is not SimCC."""
    if len(outputs) != 2 or len(input_shape) != 4:
        return None
    h, w = input_shape[2], input_shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        return None
    shapes = [s for _, s in outputs]
    if any(len(s) != 3 or not isinstance(s[1], int) or not isinstance(s[2], int)
           for s in shapes) or shapes[0][1] != shapes[1][1]:
        return None
    names = [n.lower() for n, _ in outputs]
    if "x" in names[0] and "y" in names[1] and names[0].replace("x", "y") == names[1]:
        xi, yi = 0, 1
    elif "y" in names[0] and "x" in names[1] and names[1].replace("x", "y") == names[0]:
        xi, yi = 1, 0
    elif shapes[0][2] * h == shapes[1][2] * w:
        xi, yi = 0, 1
    elif shapes[1][2] * h == shapes[0][2] * w:
        xi, yi = 1, 0
    else:
        return None
    rx, ry = shapes[xi][2] / w, shapes[yi][2] / h
    if rx != ry or rx <= 0:
        return None
    return SimccLayout(input_name, (h, w), xi, yi, float(rx), int(shapes[0][1]))


def normalise(crops_bhw3: np.ndarray) -> np.ndarray:
    """``(B, H, W, 3) uint8`` RGB crops -> ``(B, 3, H, W) float32`` as the model expects."""
    x = (crops_bhw3.astype(np.float32) - MEAN_RGB) / STD_RGB
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split_ratio: float) -> np.ndarray:
    """``(B, K, Wr)``, ``(B, K, Hr)`` -> ``(B, K, 3)``: x, y in crop pixels, score in [0, 1].

    Coordinates are bin / split_ratio, i.e. in the crop's pixel-index frame (pixel centres on
    integers), as MMPose's SimCC codec encodes them; the score is min(max x, max y), clipped.
    """
    if simcc_x.ndim != 3 or simcc_y.ndim != 3 or simcc_x.shape[:2] != simcc_y.shape[:2]:
        raise ValueError(f"expected simcc_x (B, K, Wr) and simcc_y (B, K, Hr) with the same B, "
                         f"K; got {simcc_x.shape}, {simcc_y.shape}")
    ix = simcc_x.argmax(axis=2)
    iy = simcc_y.argmax(axis=2)
    score = np.minimum(simcc_x.max(axis=2), simcc_y.max(axis=2))
    out = np.empty((*simcc_x.shape[:2], 3), dtype=np.float32)
    out[..., 0] = ix / split_ratio
    out[..., 1] = iy / split_ratio
    out[..., 2] = np.clip(np.nan_to_num(score, nan=0.0), 0.0, 1.0)
    return out


class NotSimcc(ModelError):
    """The graph is not a SimCC graph at all (as opposed to a SimCC graph we cannot use)."""


class SimccModel:
    """One ONNX SimCC session: ``run(crops (B, 3, H, W) float32) -> (B, K, 3)`` in crop pixels.

    A graph with a fixed batch size gets its crops in chunks padded to that size; one with a
    fixed batch of 1 is run crop by crop (logged once: re-export it with a dynamic batch).
    """

    def __init__(self, path: str, providers: list, intra_threads: int = 0) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if intra_threads:
            opts.intra_op_num_threads = intra_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"cannot load ONNX model {path}: {err}") from err
        inp = self.session.get_inputs()
        outs = [(o.name, o.shape) for o in self.session.get_outputs()]
        layout = detect_simcc(inp[0].name, inp[0].shape, outs) if len(inp) == 1 else None
        if layout is None:
            raise NotSimcc(f"{path}: not a SimCC graph (one input (B, 3, H, W) with fixed H, W "
                             f"and outputs simcc_x (B, K, W*r), simcc_y (B, K, H*r)); got "
                             f"inputs {[(i.name, i.shape) for i in inp]}, outputs {outs}")
        if layout.num_keypoints < 17:
            raise ModelError(f"{path}: SimCC graph with {layout.num_keypoints} keypoints; the "
                             "first 17 must be COCO's (COCO, Halpe-26 and COCO-WholeBody are)")
        self.layout = layout
        batch = inp[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) else None
        self._names = [o.name for o in self.session.get_outputs()]
        if self.fixed_batch == 1:
            log.warning("%s has a fixed batch of 1: crops run one per call; export it with a "
                        "dynamic batch axis (docs/models.md)", path)

    def run(self, crops: np.ndarray) -> np.ndarray:
        step = self.fixed_batch or len(crops)
        parts = []
        for start in range(0, len(crops), max(step, 1)):
            chunk = crops[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:
                chunk = np.concatenate([chunk, np.zeros((self.fixed_batch - n, *chunk.shape[1:]),
                                                        chunk.dtype)])
            outs = self.session.run(self._names, {self.layout.input_name: chunk})
            kp = decode_simcc(outs[self.layout.x_output], outs[self.layout.y_output],
                              self.layout.split_ratio)
            parts.append(kp[:n, :17])
        return np.concatenate(parts) if parts else np.zeros((0, 17, 3), np.float32)
