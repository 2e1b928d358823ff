"""The per-image result in the original API's format: its 21 keypoint names, the result and the
error shapes, and their JSON bytes.

Why in the core: the engine builds results, while evaluation, exports and recounts read them;
one home for the format means none of them can drift from what ``posebatch run`` writes. Why a
dataclass and not a dict from the start: it validates its own shapes once, and the API dict is
produced in one place (``to_api``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    import orjson as _orjson
except ImportError:  # optional: json writes the same bytes, slower
    _orjson = None

API21_NAMES: tuple[str, ...] = (
    "top_head", "left_ear", "right_ear", "left_eye", "right_eye", "nose",
    "left_mouth_corner", "right_mouth_corner", "neck",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
    "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle", "right_ankle",
)
"""The API's keypoints in SPEC order; left and right are the person's own."""

COORD_DECIMALS = 2
SCORE_DECIMALS = 4


_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)  # a forked worker must not repeat its parent's


def new_log_id() -> int:
    """A random unsigned 64-bit id: unique per result without coordination between workers.

    From a generator seeded once per process from the OS (again in a forked child), not
    ``secrets``: that is a getrandom() system call per result, which hands the GIL on from the
    writer threads. The id needs to be unique, not unguessable."""
    return _ids.getrandbits(64)


_PART_JSON = '"%s":{"x":%%r,"y":%%r,"score":%%r}'
_PERSON_JSON = ('{"body_parts":{' + ",".join(_PART_JSON % n for n in API21_NAMES)
                + '},"location":{"left":%r,"top":%r,"width":%r,"height":%r,"score":%r}}')
_PERSON_TEXT = _PERSON_JSON.replace("%r", "%s")  # filled with numbers' texts
_PLAIN_FLOAT_MAX = 1e15
_PLAIN_FLOAT_MIN = 1e-4
"""Between these (or 0), a finite float's ``repr`` is what both json and orjson write (no
exponent); rounded to 2 or 4 decimals, every number of a result is 0 or at least 1e-4."""


@dataclass(frozen=True)
class PoseResult:
    """Persons of one image in upright original pixels.

    kpts (n, 21, 3): x, y, score per API keypoint; boxes_xyxy (n, 4); box_scores (n,).
    """

    kpts: np.ndarray
    boxes_xyxy: np.ndarray
    box_scores: np.ndarray
    width: int | None
    """Upright image size in pixels; None only for a result read back without its size."""
    height: int | None
    source: str | None = None
    """Where the image came from (a path or key), when the caller said; never in the JSON."""

    def __post_init__(self) -> None:
        if np.ndim(self.box_scores) != 1:
            raise ValueError(f"expected box_scores of shape (n,), got {np.shape(self.box_scores)}")
        n = len(self.box_scores)
        if self.kpts.shape != (n, 21, 3):
            raise ValueError(f"expected kpts of shape ({n}, 21, 3), got {self.kpts.shape}")
        if self.boxes_xyxy.shape != (n, 4):
            raise ValueError(f"expected boxes_xyxy of shape ({n}, 4), got {self.boxes_xyxy.shape}")
        if (self.width is None) != (self.height is None) or (
                self.width is not None and (self.width <= 0 or self.height <= 0)):
            raise ValueError(f"expected a positive image size (or none), got "
                             f"{self.width}x{self.height}")

    def __len__(self) -> int:
        return len(self.box_scores)

    names = API21_NAMES
    """The 21 keypoint names, in the order of the second axis of ``xy`` and ``scores``."""

    @property
    def xy(self) -> np.ndarray:
        """``(n, 21, 2)`` keypoint x, y in upright image pixels."""
        return self.kpts[..., :2]

    @property
    def scores(self) -> np.ndarray:
        """``(n, 21)`` keypoint scores in [0, 1]."""
        return self.kpts[..., 2]

    def valid(self, kpt_score: float = 0.2, min_kpts: int = 3,
              box_score: float = 0.03) -> np.ndarray:
        """``(n,)`` bool: the seed's rule (more than ``min_kpts`` keypoints scoring above
        ``kpt_score``, and a box score above ``box_score``); a job's own values are its
        ``valid_kpt_score``, ``valid_min_kpts`` and ``valid_box_score``."""
        confident = (self.scores > kpt_score).sum(axis=1)
        return (confident > min_kpts) & (self.box_scores > box_score)

    @classmethod
    def empty(cls, width: int | None = None, height: int | None = None) -> PoseResult:
        """No persons (an image where nobody was found)."""
        return cls(np.zeros((0, 21, 3)), np.zeros((0, 4)), np.zeros((0,)), width, height)

    @classmethod
    def from_api(cls, result: dict[str, Any], width: int | None = None,
                 height: int | None = None) -> PoseResult:
        """Read an API result dict (a ``<image>.json``) back; ``to_api`` gives the same dict
        again (log_id aside). The JSON holds no image size: pass it when known (``_counts.csv``
        has it). An error result raises ValueError: check ``result_failure`` first."""
        if "error_code" in result:
            raise ValueError(f"expected a result with persons, got error "
                             f"{result['error_code']}: {result.get('error_msg')}")
        persons = result.get("person_info")
        if not isinstance(persons, list):
            raise ValueError(f"expected person_info to be a list, got {type(persons).__name__}")
        if not persons:
            return cls.empty(width, height)
        try:
            kpts = np.array([[[p["body_parts"][name][f] for f in ("x", "y", "score")]
                              for name in API21_NAMES] for p in persons], dtype=np.float64)
            loc = np.array([[p["location"][f] for f in ("left", "top", "width", "height",
                                                         "score")] for p in persons],
                           dtype=np.float64)
        except (KeyError, TypeError) as err:
            raise ValueError(f"expected every person to have location and the 21 body_parts "
                             f"with x, y, score; missing {err}") from err
        boxes = np.stack([loc[:, 0], loc[:, 1], loc[:, 0] + loc[:, 2], loc[:, 1] + loc[:, 3]], 1)
        return cls(kpts, boxes, loc[:, 4], width, height)

    def to_supervision(self) -> tuple[Any, Any]:
        """``(supervision.KeyPoints, supervision.Detections)`` of the persons (class 0,
        "person"); needs the ``supervision`` package (``pip install 'posebatch[supervision]'``,
        0.29 or later). Keypoint names are ``PoseResult.names``."""
        import supervision as sv

        class_id = np.zeros(len(self), dtype=int)
        keypoints = sv.KeyPoints(xy=self.xy.astype(np.float32), class_id=class_id,
                                 keypoint_confidence=self.scores.astype(np.float32))
        detections = sv.Detections(xyxy=self.boxes_xyxy.astype(np.float32),
                                   confidence=self.box_scores.astype(np.float32),
                                   class_id=class_id)
        return keypoints, detections

    @classmethod
    def from_supervision(cls, keypoints: Any, detections: Any, width: int | None = None,
                         height: int | None = None) -> PoseResult:
        """The inverse of ``to_supervision``: 21-point KeyPoints plus their person Detections."""
        xy = np.asarray(keypoints.xy, dtype=np.float64)
        if xy.ndim != 3 or xy.shape[1:] != (21, 2):
            raise ValueError(f"expected KeyPoints.xy of shape (n, 21, 2), got {xy.shape}")
        kconf = keypoints.keypoint_confidence
        conf = np.ones(xy.shape[:2]) if kconf is None else np.asarray(kconf, dtype=np.float64)
        scores = (np.ones(len(detections)) if detections.confidence is None
                  else np.asarray(detections.confidence, dtype=np.float64))
        return cls(np.concatenate([xy, conf[..., None]], axis=2),
                   np.asarray(detections.xyxy, dtype=np.float64), scores, width, height)

    def clamped(self) -> PoseResult:
        """Keypoints onto the last pixel row/column, boxes into [0, W] x [0, H] (SPEC: truncated
        parts sit on the border, keeping their score)."""
        k = self.kpts.copy()
        k[..., 0] = np.clip(k[..., 0], 0, self.width - 1)
        k[..., 1] = np.clip(k[..., 1], 0, self.height - 1)
        k[..., 2] = np.clip(k[..., 2], 0, 1)
        b = self.boxes_xyxy.copy()
        b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, self.width)
        b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, self.height)
        return PoseResult(k, b, np.clip(self.box_scores, 0, 1), self.width, self.height)

    def rounded(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The numbers of the API result, persons by descending score, rounded as it rounds
        them: keypoints ``(n, 21, 3)`` (x, y to 2 decimals, score to 4), location ``(n, 4)``
        (left, top, width, height), box scores ``(n,)``; float64.

        The rounding runs on whole arrays (``round_like_python``: the values Python's ``round``
        gives, bit for bit): the same numbers as rounding one by one, far less work per person.
        """
        order = np.argsort(-self.box_scores, kind="stable")
        kpts = self.kpts[order]
        boxes = self.boxes_xyxy[order].astype(np.float64)
        k = np.empty(kpts.shape, np.float64)
        k[..., :2] = round_like_python(kpts[..., :2], COORD_DECIMALS)
        k[..., 2] = round_like_python(kpts[..., 2], SCORE_DECIMALS)
        # left, top, width, height: x2 - x1 in float64, as the Python floats before were
        loc = round_like_python(np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0],
                                          boxes[:, 3] - boxes[:, 1]], axis=1), COORD_DECIMALS)
        scores = round_like_python(self.box_scores[order], SCORE_DECIMALS)
        return k, loc, scores

    def counts(self, kpt_score: float, min_kpts: int, box_score: float, *,
               numbers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
               ) -> tuple[int, int]:
        """(persons, valid persons) by the numbers the JSON holds: what
        ``posebatch.schema.person_counts`` reads back from it, without building it.
        ``numbers``: this result's ``rounded()``, when the caller has them already."""
        k, _loc, scores = numbers if numbers is not None else self.rounded()
        valid = ((k[..., 2] > kpt_score).sum(axis=1) > min_kpts) & (scores > box_score)
        return len(scores), int(valid.sum())

    def to_json(self, log_id: int | None = None, *,
                numbers: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> bytes:
        """``encode_result(self.to_api(log_id))``, the same bytes, straight from the arrays.

        Why: on a writer thread the API dict (a dict per keypoint, 126 for 6 persons) cost
        four times the JSON encoding, all of it holding the GIL. A float's ``repr`` is what
        json and orjson write for every finite number without an exponent, and rounded to 2
        or 4 decimals a number below 1e15 has none; anything else (a NaN, a huge value) goes
        through the dict (tests/test_batched_results.py compares the two). ``numbers``: as
        in ``counts``."""
        k, loc, scores = numbers if numbers is not None else self.rounded()
        rows = np.concatenate([k.reshape(len(scores), 63), loc, scores[:, None]], axis=1)
        persons = ""
        if len(scores):
            mag = np.abs(rows)
            with np.errstate(invalid="ignore"):  # NaN: not plain
                plain = bool(((mag < _PLAIN_FLOAT_MAX) & ((mag >= _PLAIN_FLOAT_MIN)
                                                          | (rows == 0))).all())
            if not plain:
                return encode_result(self.to_api(log_id))
            if _orjson is not None:
                # orjson spells each float as repr does in this range (shortest round trip,
                # no exponent), 3x faster than repr one by one: its row texts fill the template.
                spelled = _orjson.dumps(rows, option=_orjson.OPT_SERIALIZE_NUMPY).decode("ascii")
                persons = ",".join(_PERSON_TEXT % tuple(row.split(","))
                                   for row in spelled[2:-2].split("],["))
            else:
                persons = ",".join(_PERSON_JSON % tuple(row) for row in rows.tolist())
        text = (f'{{"person_num":{len(scores)},"person_info":[{persons}],"log_id":'
                f'{new_log_id() if log_id is None else int(log_id)}}}')
        return text.encode("ascii")

    def to_api(self, log_id: int | None = None) -> dict[str, Any]:
        """The API's result dict, persons by descending score (numbers: ``rounded``)."""
        k, loc_a, scores_a = self.rounded()
        kxy = k[..., :2].tolist()
        ksc = k[..., 2].tolist()
        loc = loc_a.tolist()
        scores = scores_a.tolist()
        persons = []
        for xy, sc, (left, top, width, height), score in zip(kxy, ksc, loc, scores,
                                                             strict=True):
            parts = {name: {"x": x, "y": y, "score": s}
                     for name, (x, y), s in zip(API21_NAMES, xy, sc, strict=True)}
            location = {"left": left, "top": top, "width": width, "height": height,
                        "score": score}
            persons.append({"body_parts": parts, "location": location})
        return {
            "person_num": len(persons),
            "person_info": persons,
            "log_id": new_log_id() if log_id is None else log_id,
        }


def round_like_python(values: np.ndarray, decimals: int) -> np.ndarray:
    """``round(float(v), decimals)`` for every element, as float64, in array operations.

    Python rounds the exact binary value correctly to ``decimals`` digits and returns the double
    nearest that decimal; ``rint(v * 10**d) / 10**d`` gives the same double unless ``v * 10**d``
    lies within its rounding error of a .5 tie (or is huge or not finite): those few elements
    are rounded by Python itself.
    """
    v = np.asarray(values, dtype=np.float64)
    scale = 10.0 ** decimals
    y = v * scale
    out = np.rint(y) / scale
    with np.errstate(invalid="ignore"):
        unsure = ~(np.abs(y) < 1e9) | (np.abs(y - np.floor(y) - 0.5) < 1e-6)
    if unsure.any():
        flat_out, flat_v = out.reshape(-1), v.reshape(-1)
        for i in np.flatnonzero(unsure.reshape(-1)):
            flat_out[i] = round(float(flat_v[i]), decimals)
    return out


@dataclass(frozen=True)
class Failure:
    """An image that has no persons because it failed: the API's error code and message."""

    code: int
    message: str
    source: str | None = None

    def to_api(self, log_id: int | None = None) -> dict[str, Any]:
        return error_result(self.code, self.message, log_id)


def person_counts(result: dict[str, Any], kpt_score: float, min_kpts: int,
                  box_score: float) -> tuple[int, int]:
    """(persons, valid persons) of a result with persons, by ``PoseResult.valid``'s rule, read
    straight off the JSON: every image's record is counted on the writer threads, and building
    the arrays first cost 10x (620 vs 65 us for a 37-person image)."""
    persons = result["person_info"]
    valid = sum(1 for p in persons
                if sum(1 for part in p["body_parts"].values() if part["score"] > kpt_score)
                > min_kpts and p["location"]["score"] > box_score)
    return len(persons), valid


def result_failure(result: dict[str, Any]) -> Failure | None:
    """The failure of an error result (``{"error_code", "error_msg"}``), None for persons."""
    if "error_code" not in result:
        return None
    return Failure(int(result["error_code"]), str(result.get("error_msg", "")))


def read_result(result: dict[str, Any], width: int | None = None,
                height: int | None = None) -> PoseResult | Failure:
    """A ``<image>.json`` as the typed result or its failure: the one place results are read."""
    failure = result_failure(result)
    return failure if failure is not None else PoseResult.from_api(result, width, height)


def error_result(code: int, message: str, log_id: int | None = None) -> dict[str, Any]:
    """The API's error shape: ``{"error_code", "error_msg", "log_id"}``."""
    return {"error_code": code, "error_msg": message,
            "log_id": new_log_id() if log_id is None else log_id}


def encode_result(result: dict[str, Any]) -> bytes:
    """The bytes written to ``<image>.json``: compact UTF-8, the same for local and cluster runs.

    orjson (when installed) writes the same bytes as ``json.dumps`` here 15x faster, except for
    what it spells otherwise: NaN/infinity and None (``null``), floats below 1e-4 (``0.00001``
    or ``3.2e-7``, json's ``1e-05`` and ``3.2e-07``) and integers beyond 64 bits (it refuses):
    those results, and any whose text merely contains such a spelling (``null``, ``0.0000``,
    ``e-``), go through ``json`` (tests/test_batched_results.py).
    """
    if _orjson is not None:
        try:
            data = _orjson.dumps(result)
        except TypeError:  # numpy scalars, float subclasses, big integers, non-str keys
            pass
        else:
            if b"null" not in data and b"0.0000" not in data and b"e-" not in data:
                return data
    return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def is_api_result(obj: Any) -> bool:
    """True for a result or error result in the shape this module writes.

    Why: a folder may already hold another tool's ``<image>.json`` (a photo library's sidecar, or
    output = input); it must be neither counted as a result nor overwritten.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get("log_id"), int):
        return False
    if "error_code" in obj:
        return isinstance(obj["error_code"], int) and isinstance(obj.get("error_msg"), str)
    persons = obj.get("person_info")
    return (isinstance(obj.get("person_num"), int) and isinstance(persons, list)
            and all(isinstance(p, dict) and isinstance(p.get("body_parts"), dict)
                    and isinstance(p.get("location"), dict) for p in persons))
