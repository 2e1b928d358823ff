"""``posebatch report``: a static page to look at a job's results by eye.

Why these three galleries: the most crowded images show whether counting holds up where it is
hardest, the least confident show where the model struggles, and a random sample shows what a
typical result looks like; together they answer "can I trust these numbers?" in a minute.
Selection streams over every result with bounded heaps and a reservoir, so memory stays flat.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posebatch.errors import StorageError
from posebatch.exports.skeleton import NAMES
from posebatch.exports.source import JobOutput
from posebatch.overlay import draw_overlay, open_upright, to_jpeg
from posebatch.records import valid_flags
from posebatch.report.charts import hbar_svg, histogram_svg
from posebatch.report.page import Page, Tile, render
from posebatch.schema import PoseResult
from posebatch.settings import JobSettings
from posebatch.storage import Storage

PER_GALLERY = 12
THUMB_SIDE = 320
FULL_SIDE = 1600
SEED = 12345


@dataclass(frozen=True)
class Pick:
    key: str
    persons: int
    valid: int
    confidence: float


def collect(job_out: JobOutput, job: JobSettings, per_gallery: int = PER_GALLERY
            ) -> tuple[list[float], int, dict[str, list[Pick]]]:
    """One pass over the results: per-keypoint score sums over valid persons, and the picks."""
    sums = [0.0] * len(NAMES)
    valid_n = 0
    # Bounded heaps whose smallest entry is dropped first; on ties the earlier key (smaller
    # sequence number, rows come sorted) wins, so the pick does not depend on thread timing.
    crowded: list[tuple[int, int, int, Pick]] = []  # keeps the largest (valid, persons)
    unsure: list[tuple[float, int, Pick]] = []  # keeps the smallest confidence
    sample: list[Pick] = []
    rng = random.Random(SEED)
    for seq, (row, api) in enumerate(job_out.results(job_out.rows())):
        typed = PoseResult.from_api(api)
        flags = valid_flags(typed, job).tolist()
        scores = typed.scores.tolist()
        for person_scores, ok in zip(scores, flags, strict=True):
            if ok:
                valid_n += 1
                for i, s in enumerate(person_scores):
                    sums[i] += s
        pick = Pick(row.key, len(typed), sum(flags), _confidence(scores))
        if len(sample) < per_gallery:  # reservoir sampling: a uniform sample in one pass
            sample.append(pick)
        else:
            j = rng.randrange(seq + 1)
            if j < per_gallery:
                sample[j] = pick
        if pick.valid > 0:
            _push(crowded, (pick.valid, pick.persons, -seq, pick), per_gallery)
        if len(typed):
            _push(unsure, (-pick.confidence, -seq, pick), per_gallery)
    means = [s / valid_n if valid_n else 0.0 for s in sums]
    picks = {
        "crowded": [t[-1] for t in sorted(crowded, reverse=True)],
        "unsure": [t[-1] for t in sorted(unsure, reverse=True)],
        "sample": sorted(sample, key=lambda p: p.key),
    }
    return means, valid_n, picks


def _push(heap: list, item: tuple, n: int) -> None:
    if len(heap) < n:
        heapq.heappush(heap, item)
    elif item > heap[0]:
        heapq.heapreplace(heap, item)


def _confidence(scores: list[list[float]]) -> float:
    """Mean keypoint score over all persons of the image (1.0 when there is nobody)."""
    flat = [s for person in scores for s in person]
    return sum(flat) / len(flat) if flat else 1.0


def build_report(output_url: str, dest: Path, *, storage: Storage | None = None,
                 per_gallery: int = PER_GALLERY) -> Path:
    job_out = JobOutput(output_url, storage)
    job = job_out.job_settings()
    summary = job_out.current_summary()  # exact while per-job tables are pending too
    means, valid_n, picks = collect(job_out, job, per_gallery)
    dest.mkdir(parents=True, exist_ok=True)
    src = job_out.input_storage()
    notes = [f"Output: {job_out.storage.url}", f"Input: {summary.get('input')}",
             f"Model: {summary.get('model', {}).get('name')}, finished {summary.get('finished')}"]
    drawn: dict[str, Tile | None] = {}
    galleries = []
    titles = {"crowded": "Most crowded", "unsure": "Least confident", "sample": "Random sample"}
    for name, chosen in picks.items():
        tiles = []
        for pick in chosen:
            if pick.key not in drawn:
                drawn[pick.key] = _draw(job_out, src, job, pick, dest, len(drawn), notes)
            tile = drawn[pick.key]
            if tile is not None:
                tiles.append(tile)
        galleries.append((name, titles[name], tiles))
    page = Page(
        title=f"posebatch report: {summary.get('job_id', '')}",
        summary_rows=_summary_rows(summary, valid_n),
        failures=summary.get("failure_reasons", []),
        histogram_svg=histogram_svg(_histogram(summary), title="valid persons per image"),
        keypoint_svg=hbar_svg(dict(zip(NAMES, means, strict=True)), title="mean scores"),
        galleries=galleries, notes=notes,
    )
    index = dest / "index.html"
    index.write_text(render(page), encoding="utf-8")
    return index


def _summary_rows(s: dict[str, Any], valid_n: int) -> list[tuple[str, str]]:
    rows = [("images", s.get("images_seen")), ("succeeded", s.get("succeeded")),
            ("failed", s.get("failed"))]
    rows += [(f"failed, error_code {code}", n) for code, n in s.get("failed_by_code", {}).items()]
    rows += [("persons", s.get("persons_total")), ("valid persons", s.get("valid_persons_total"))]
    return [(k, str(v)) for k, v in rows]


def _histogram(s: dict[str, Any], cap: int = 20) -> dict[str, int]:
    """Persons per image, every count up to the largest; counts over ``cap`` share one bar."""
    hist = {int(k): v for k, v in s.get("valid_persons_histogram", {}).items()}
    if not hist:
        return {}
    top = max(hist)
    out = {str(k): hist.get(k, 0) for k in range(min(top, cap) + 1)}
    if top > cap:
        out[f">{cap}"] = sum(v for k, v in hist.items() if k > cap)
    return out


def _draw(job_out: JobOutput, src: Storage | None, job: JobSettings, pick: Pick, dest: Path,
          n: int, notes: list[str]) -> Tile | None:
    if src is None:
        return None
    try:
        im = open_upright(src.read(pick.key))
    except (StorageError, OSError) as err:
        notes.append(f"{pick.key}: image not readable for its overlay ({err})")
        return None
    typed = PoseResult.from_api(json.loads(job_out.storage.read(job_out.result_key(pick.key))))
    over = draw_overlay(im, typed, job.valid_kpt_score, valid_flags(typed, job).tolist())
    stem = f"{n:04d}_" + re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(pick.key))[:60]
    full = f"overlays/{stem}.jpg"
    thumb = f"thumbs/{stem}.jpg"
    for rel, side in ((full, FULL_SIDE), (thumb, THUMB_SIDE)):
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_jpeg(over, side))
    caption = (f"{pick.key}: {pick.valid} valid / {pick.persons} persons, "
               f"mean keypoint score {pick.confidence:.2f}")
    return Tile(pick.key, thumb, full, caption)
