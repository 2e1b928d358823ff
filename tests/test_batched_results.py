"""Batched post-processing gives exactly the per-image path's results (issue 20).

The model's thread decodes, suppresses and back-projects a whole batch in array operations and
rounds whole arrays; the JSON may come from orjson. None of it may change a byte of a result:
each piece is compared with the per-image code it replaced (kept here as main had it, or still
in the engine as ``decode_yolo_raw`` / ``nms``), and ``posebatch run`` on the dev set with ONNX
Runtime FP32 against main's code before the change, run here from git history (a golden file
from one host and model was skipped on every other).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posebatch.schema import API21_NAMES, PoseResult, encode_result, round_like_python
from tests.devdata import require_dev_data
from workers.engine.layouts import PersonBatch, decode_yolo_raw, decode_yolo_raw_batch

GOLDEN = Path(__file__).parent / "data" / "golden_dev_ort_fp32.json"
CLI = [sys.executable, "-m", "posebatch.cli"]


def random_heads(rng: np.random.Generator, images: int, anchors: int) -> np.ndarray:
    out = rng.random((images, 56, anchors), dtype=np.float32)
    out[:, :2] *= 640
    out[:, 2:4] *= rng.uniform(5, 300)
    out[:, 4] = np.where(rng.random((images, anchors)) < rng.uniform(0, 0.5), out[:, 4], 0)
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", range(6))
def test_batch_decode_equals_per_image_decode_bit_for_bit(case: int):
    rng = np.random.default_rng(case)
    for trial in range(60):
        out = random_heads(rng, int(rng.integers(1, 6)), int(rng.integers(1, 400)))
        if case == 1:
            out[:, 4] = np.round(out[:, 4], 1)  # tied scores: the stable order must hold
        if case == 2:
            out[:, :4] = np.round(out[:, :4] / 50) * 50  # identical boxes
        if case == 3:
            out[0] = 0  # an image without a candidate
        if case == 4:
            out[:, 4, :7] = np.nan  # NaN scores are never candidates
            out[:, 0, 7:9] = np.nan  # NaN boxes: suppressed by nobody, suppress nobody
        iou = float(rng.uniform(0.1, 0.9))
        max_det = int(rng.integers(1, 30)) if case == 5 else 100
        got = decode_yolo_raw_batch(out, 0.05, iou, max_det).split()
        ref = [decode_yolo_raw(o, 0.05, iou, max_det) for o in out]
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert same(g.boxes_xyxy, r.boxes_xyxy), trial
            assert same(g.scores, r.scores), trial
            assert same(g.kpts, r.kpts), trial


def test_batch_decode_over_the_candidate_cap_keeps_each_images_top_candidates():
    rng = np.random.default_rng(7)
    out = random_heads(rng, 2, 8400)
    out[0, 4] = rng.uniform(0.06, 1.0, 8400).astype(np.float32)  # 8400 candidates > cap
    got = decode_yolo_raw_batch(out, 0.05, 0.6, 100).split()
    ref = [decode_yolo_raw(o, 0.05, 0.6, 100) for o in out]
    for g, r in zip(got, ref, strict=True):
        assert same(g.boxes_xyxy, r.boxes_xyxy) and same(g.kpts, r.kpts)


def test_person_batch_round_trips_through_lists():
    rng = np.random.default_rng(3)
    out = random_heads(rng, 5, 300)
    out[2, 4] = 0
    pb = decode_yolo_raw_batch(out, 0.05, 0.6, 100)
    again = PersonBatch.from_list(pb.split())
    for a, b in zip(again.split(), pb.split(), strict=True):
        assert same(a.kpts, b.kpts) and same(a.scores, b.scores)
    both = PersonBatch.concat([pb, pb])
    assert list(both.counts) == list(pb.counts) * 2
    assert list(both.image) == list(pb.image) + [i + 5 for i in pb.image]


def to_api_main(r: PoseResult, log_id: int) -> dict:
    """``PoseResult.to_api`` as main had it: Python's round per number."""
    order = np.argsort(-r.box_scores, kind="stable")
    persons = []
    for kpts, (x1, y1, x2, y2), score in zip(r.kpts[order].tolist(),
                                              r.boxes_xyxy[order].tolist(),
                                              r.box_scores[order].tolist(), strict=True):
        parts = {name: {"x": round(x, 2), "y": round(y, 2), "score": round(s, 4)}
                 for name, (x, y, s) in zip(API21_NAMES, kpts, strict=True)}
        location = {"left": round(x1, 2), "top": round(y1, 2), "width": round(x2 - x1, 2),
                    "height": round(y2 - y1, 2), "score": round(score, 4)}
        persons.append({"body_parts": parts, "location": location})
    return {"person_num": len(persons), "person_info": persons, "log_id": log_id}


def test_to_api_equals_rounding_number_by_number():
    rng = np.random.default_rng(11)
    for n in (0, 1, 3, 20, 57):
        kpts = rng.uniform(0, 4096, (n, 21, 3)).astype(np.float32)
        kpts[..., 2] = rng.random((n, 21), dtype=np.float32)
        kpts[: n // 2, :5, :2] = np.round(kpts[: n // 2, :5, :2] * 8) / 8  # exact .x25 ties
        kpts[: n // 3, 5:8, 2] = np.array([0.00005, 0.12345, 0.5], np.float32)
        x1y1 = rng.uniform(0, 2000, (n, 2)).astype(np.float32)
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0, 500, (n, 2)).astype(np.float32)], 1)
        scores = np.round(rng.random(n, dtype=np.float32), 2)  # ties in the person order
        r = PoseResult(kpts, boxes, scores, 4096, 4096)
        assert encode_result(r.to_api(7)) == encode_result(to_api_main(r, 7))
        assert r.to_api(7) == to_api_main(r, 7)


def test_round_like_python_is_round_bit_for_bit():
    rng = np.random.default_rng(5)
    v = np.concatenate([
        rng.uniform(-5000, 5000, 200_000), rng.random(200_000).astype(np.float32),
        np.arange(-20_000, 20_000) / 1000, np.arange(0, 40_000) / 8,
        [math.nan, math.inf, -math.inf, -0.0, 0.0, 1e300, -1e-300, 5e-324, 2.675, 0.125]])
    for decimals in (2, 4):
        got = round_like_python(v, decimals)
        ref = np.array([round(float(x), decimals) for x in v])
        assert np.array_equal(got.view(np.int64), ref.view(np.int64))


ODD = [0.0, -0.0, 1e-4, 1e-5, -3.2e-7, 5e-324, 1e15, 1e16, -1.5e16, 1e300, math.nan, math.inf,
       -math.inf, 0.1 + 0.2, 2.675, 123456.789, 2**53 + 0.0]


def test_encode_result_bytes_are_json_dumps_bytes():
    rng = np.random.default_rng(2)
    results: list = [
        {"error_code": 216201, "error_msg": "format é \u2028 \x7f \x1f \"q\" \\ 0.00001 null",
         "log_id": 2**64 - 1},
        {"error_code": 1, "error_msg": "x", "log_id": 2**64},  # beyond orjson's integers
        {"person_num": 0, "person_info": [], "log_id": 0},
        {"a": None, "b": [True, False], "c": (1, 2), "d": {"e": -(2**63)}},
        {"f": np.float64(0.5)},  # a float subclass: json takes it, orjson does not
        {"g": [float(x) for x in ODD]},
    ]
    for _ in range(300):
        n = int(rng.integers(0, 8))
        kpts = rng.uniform(0, 5000, (n, 21, 3)).astype(np.float32)
        kpts[..., 2] = rng.random((n, 21))
        x1y1 = rng.uniform(0, 3000, (n, 2)).astype(np.float32)
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0, 900, (n, 2)).astype(np.float32)], 1)
        result = PoseResult(kpts, boxes, rng.random(n).astype(np.float32), 5000, 5000).to_api()
        if n and rng.random() < 0.3:
            result["person_info"][0]["location"]["score"] = float(rng.choice(ODD))
        results.append(result)
    for result in results:
        ref = json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        assert encode_result(result) == ref, result


@pytest.mark.parametrize("with_orjson", [True, False])
def test_to_json_is_the_dicts_bytes_and_counts_are_what_the_json_counts(with_orjson, monkeypatch):
    """The writer's JSON comes straight from the arrays (``PoseResult.to_json``) and its record
    from ``counts``: the same bytes as the API dict through ``encode_result``, the same counts
    as reading that JSON back (``person_counts``), odd numbers included; with orjson spelling
    the numbers and without it (``repr``)."""
    from posebatch import schema
    from posebatch.schema import person_counts

    assert schema._orjson is not None  # a dependency: the fast path is the one in use
    if not with_orjson:
        monkeypatch.setattr(schema, "_orjson", None)

    rng = np.random.default_rng(3)
    odd = np.array(ODD, np.float64)
    for i in range(400):
        n = int(rng.integers(0, 9))
        kpts = rng.uniform(-10, 5000, (n, 21, 3))
        kpts[..., 2] = rng.choice([rng.random(), 0.2, 0.20004, 0.00004, 1.0, 0.0])
        kpts[..., 2] = np.where(rng.random((n, 21)) < 0.5, rng.random((n, 21)), kpts[..., 2])
        x1y1 = rng.uniform(0, 3000, (n, 2))
        boxes = np.concatenate([x1y1, x1y1 + rng.uniform(0, 900, (n, 2))], 1)
        scores = rng.choice([0.03, 0.030001, 0.5, 0.0], n) if i % 3 else rng.random(n)
        if n and i % 7 == 0:  # NaN, infinities, huge and tiny numbers, negative zero
            kpts.reshape(-1)[rng.integers(0, kpts.size)] = rng.choice(odd)
            boxes.reshape(-1)[rng.integers(0, boxes.size)] = rng.choice(odd)
        dtype = np.float32 if i % 2 else np.float64
        with np.errstate(over="ignore"):  # 1e300 as float32: an infinity, on purpose
            r = PoseResult(kpts.astype(dtype), boxes.astype(dtype), scores.astype(dtype), 5000,
                           5000)
        assert r.to_json(i) == encode_result(r.to_api(i)), (i, n)
        assert r.to_json(i, numbers=r.rounded()) == r.to_json(i)
        for rule in ((0.2, 3, 0.03), (0.0, 0, 0.0), (0.5, 10, 0.3)):
            assert r.counts(*rule) == person_counts(r.to_api(i), *rule), (i, rule)


def without_log_id(data: bytes) -> bytes:
    result = json.loads(data)
    result.pop("log_id")
    return encode_result(result)


def cpu_signature() -> tuple[str, list[str]]:
    text = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "?")
    flags = next((line.split() for line in text.splitlines() if line.startswith("flags")), [])
    return name, [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_bf16") if f in flags]


REFERENCE_COMMIT = "9f35dde"
"""The main that wrote the golden (its ``made_from``): before the batched post-processing."""

RUN_FLAGS = ("--backend", "ort", "--precision", "fp32", "--providers", "cpu", "--force",
             "--no-progress")


def reference_run(dev: Path, work: Path) -> dict[str, bytes] | None:
    """``posebatch run`` of ``REFERENCE_COMMIT``'s own code (from this repository's history) on
    the dev set, here, with this host's model and kernels: the golden of any host. None where the
    history is not at hand (a source tarball, a shallow clone)."""
    import io
    import tarfile

    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(["git", "-C", str(root), "archive", "--format=tar",
                              REFERENCE_COMMIT], capture_output=True, timeout=60)
    if archive.returncode != 0:
        return None
    src = work / "reference-src"
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    out = work / "reference-out"
    proc = subprocess.run([*CLI, "run", str(dev / "images"), "--out", str(out), *RUN_FLAGS],
                          capture_output=True, text=True, timeout=300, cwd=src,
                          env={**os.environ, "PYTHONPATH": str(src)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {str(p.relative_to(out))[:-len(".json")]: without_log_id(p.read_bytes())
            for p in sorted(out.rglob("*.json")) if not p.name.startswith("_")}


def golden_results() -> dict[str, bytes] | None:
    """The golden file, where this host and model are the ones that wrote it."""
    from posebatch.modelstore import resolve_model
    from posebatch.settings import RuntimeSettings, from_env

    golden = json.loads(GOLDEN.read_text())
    rt = from_env(RuntimeSettings)
    if resolve_model(rt.model, rt.cache_dir).sha256 != golden["model_sha256"]:
        return None
    if list(cpu_signature()) != [golden["cpu"], golden["isa"]]:
        return None  # ONNX Runtime's kernels differ per instruction set: other floats
    return {key: encode_result(result) for key, result in golden["results"].items()}


def test_dev_set_results_are_byte_identical_to_mains(tmp_path: Path):
    """``posebatch run`` on the dev set, ONNX Runtime FP32 on the CPU, against results written
    by main before the batched post-processing (log_id aside): that main's code run here from
    git history (the golden file only where history is missing and the host is the golden's)."""
    from posebatch.testing.servers import skip_or_fail

    dev = require_dev_data()
    expected = reference_run(dev, tmp_path) or golden_results()
    if expected is None:
        skip_or_fail(f"no git history for {REFERENCE_COMMIT} and the golden is another host's")
    assert len(expected) == 13
    out = tmp_path / "out"
    # Float input as on main: a uint8 input moves the letterbox's gray by one float32 step
    # (tests/test_uint8_input.py checks that path's accuracy instead).
    proc = subprocess.run([*CLI, "run", str(dev / "images"), "--out", str(out), *RUN_FLAGS],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "POSEBATCH_UINT8_INPUT": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for key, data in expected.items():
        assert without_log_id((out / f"{key}.json").read_bytes()) == data, key
