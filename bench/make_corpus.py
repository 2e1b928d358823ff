"""Generate the benchmark corpus: photos at the sizes users actually have, from the dev images.

Each corpus image is one dev image placed (scaled to fit, random scale and offset, random mirror)
on a blurred colour wash of itself, at 1920x1080 (video frames) or 4032x3024 (12 MP phone photos),
with light sensor-like noise so the JPEG sizes are realistic, saved as JPEG quality 90. A share of
the phone photos is stored the way phones store portrait shots: sensor-landscape pixels plus EXIF
orientation 6, so the decoder's rotation path is part of the measurement.

The corpus is deterministic (seeded) and cached: ``corpus/<n>-<stamp>/`` where the stamp hashes
the parameters, this script and the source images; a second call with the same inputs is a no-op.

    python make_corpus.py --images 200          # prints the corpus folder
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from posebatch.devdata import dev_data_dir

HERE = Path(__file__).resolve().parent
CORPUS_ROOT = HERE / "corpus"
SOURCE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}
API_MAX_BYTES = 4 * 1024 * 1024  # posebatch's default max_image_bytes: stay under it


@dataclass(frozen=True)
class Params:
    images: int = 200
    sizes: tuple[tuple[int, int], ...] = ((1920, 1080), (4032, 3024))
    """(width, height) of the stored pixels; images alternate between them."""
    quality: int = 90
    noise: float = 6.0
    """Standard deviation (gray levels) of the added noise; 0 for none."""
    portrait_share: float = 0.25
    """Share of the 4032x3024 photos stored as portrait (EXIF orientation 6)."""
    seed: int = 5


def dev_images_dir() -> Path:
    """The dev set's images (``posebatch.devdata``)."""
    found = dev_data_dir()
    if found is None:
        raise SystemExit("no dev images: set POSEBATCH_DEV_DATA to the folder holding images/")
    return found / "images"


def source_files(src: Path) -> list[Path]:
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in SOURCE_EXTS)
    if not files:
        raise SystemExit(f"no images under {src}")
    return files


def stamp(params: Params, files: list[Path], src: Path) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(params), sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    for f in files:
        h.update(f.relative_to(src).as_posix().encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def _noise_tile(rng: np.random.Generator, sigma: float, side: int = 521) -> np.ndarray:
    return np.round(rng.normal(0.0, sigma, (side, side, 3))).astype(np.int16)


def _add_noise(arr: np.ndarray, tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = arr.shape[:2]
    t = tile.shape[0]
    oy, ox = (int(v) for v in rng.integers(0, t, 2))
    reps = (-(-(h + oy) // t), -(-(w + ox) // t), 1)
    noise = np.tile(tile, reps)[oy : oy + h, ox : ox + w]
    return np.clip(arr.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def compose(src: Image.Image, out_w: int, out_h: int, rng: np.random.Generator) -> Image.Image:
    """``src`` scaled to fit (x0.75-1.0) at a random offset on a blurred colour wash of itself."""
    src = src.convert("RGB")
    if rng.random() < 0.5:
        src = src.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sw, sh = src.size
    cover = max(out_w / sw, out_h / sh)
    # A colour wash, not a second copy of the people: 1/32 scale, blurred, scaled back up.
    small = src.resize((max(1, round(sw * cover / 32)), max(1, round(sh * cover / 32))),
                       Image.Resampling.BILINEAR).filter(ImageFilter.GaussianBlur(4))
    bg = small.resize((round(sw * cover), round(sh * cover)), Image.Resampling.BILINEAR)
    left, top = (bg.width - out_w) // 2, (bg.height - out_h) // 2
    canvas = bg.crop((left, top, left + out_w, top + out_h))
    fit = min(out_w / sw, out_h / sh) * float(rng.uniform(0.75, 1.0))
    fg = src.resize((max(1, round(sw * fit)), max(1, round(sh * fit))),
                    Image.Resampling.LANCZOS)
    x = int(rng.integers(0, out_w - fg.width + 1))
    y = int(rng.integers(0, out_h - fg.height + 1))
    canvas.paste(fg, (x, y))
    return canvas


def encode_jpeg(img: Image.Image, quality: int, orientation: int = 1) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, "JPEG", quality=quality, **kwargs)
    return buf.getvalue()


def make_one(i: int, src_path: Path, params: Params, tile: np.ndarray) -> tuple[bytes, dict]:
    rng = np.random.default_rng([params.seed, i])
    stored_w, stored_h = params.sizes[i % len(params.sizes)]
    portrait = (stored_w, stored_h) == (4032, 3024) and rng.random() < params.portrait_share
    up_w, up_h = (stored_h, stored_w) if portrait else (stored_w, stored_h)
    with Image.open(src_path) as im:
        upright = compose(im, up_w, up_h, rng)
    arr = np.asarray(upright)
    if params.noise > 0:
        arr = _add_noise(arr, tile, rng)
    stored = Image.fromarray(arr)
    orientation = 1
    if portrait:
        # Orientation 6 means "rotate 90 degrees clockwise to display": store it counter-rotated.
        stored = stored.transpose(Image.Transpose.ROTATE_90)
        orientation = 6
    data = encode_jpeg(stored, params.quality, orientation)
    q = params.quality
    while len(data) > API_MAX_BYTES * 0.97 and q > 60:  # keep every file acceptable
        q -= 5
        data = encode_jpeg(stored, q, orientation)
    meta = {"source": src_path.name, "stored_wh": [stored_w, stored_h],
            "upright_wh": [up_w, up_h], "orientation": orientation, "quality": q,
            "bytes": len(data)}
    return data, meta


def _store(tmp: Path, i: int, src_path: Path, data: bytes, meta: dict) -> dict:
    w, h = meta["stored_wh"]
    rel = f"images/{w}x{h}/{i:04d}_{src_path.stem[:40]}.jpg"
    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp / rel).write_bytes(data)
    return {"path": rel, **meta}


def ensure_corpus(n: int = 200, *, quiet: bool = False, **overrides) -> Path:
    """Return the corpus folder for ``n`` images, generating it only when missing or stale."""
    params = Params(images=n, **overrides)
    src = dev_images_dir()
    files = source_files(src)
    tag = stamp(params, files, src)
    out = CORPUS_ROOT / f"{n}-{tag}"
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        return out
    tmp = CORPUS_ROOT / f".{n}-{tag}.tmp"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    (tmp / "images").mkdir(parents=True)
    tile = _noise_tile(np.random.default_rng(params.seed), params.noise)
    entries = []
    # One process per core: composing and encoding take ~0.1 s per 1080p image, and a GPU check
    # wants thousands of them. Each image's randomness is seeded by its index, so the corpus does
    # not depend on the number of processes.
    sources = [files[i % len(files)] for i in range(n)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        # partial: the 0.8 MB noise tile travels once per chunk of 8, not once per image.
        made = pool.map(partial(make_one, params=params, tile=tile), range(n), sources,
                        chunksize=8)
        for i, (src_path, (data, meta)) in enumerate(zip(sources, made, strict=True)):
            entries.append(_store(tmp, i, src_path, data, meta))
            if not quiet and (i + 1) % 20 == 0:
                print(f"corpus: {i + 1}/{n}", file=sys.stderr)
    manifest = {"params": asdict(params), "stamp": tag, "source_dir": str(src),
                "sources": len(files), "images": entries,
                "total_bytes": sum(e["bytes"] for e in entries)}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.rename(out)
    return out


def describe(folder: Path) -> str:
    m = json.loads((folder / "manifest.json").read_text())
    by_size: dict[str, list[int]] = {}
    for e in m["images"]:
        key = "x".join(map(str, e["stored_wh"]))
        by_size.setdefault(key, []).append(e["bytes"])
    parts = [f"{len(v)} x {k} (mean {np.mean(v) / 1e6:.2f} MB, max {max(v) / 1e6:.2f} MB)"
             for k, v in sorted(by_size.items())]
    portraits = sum(1 for e in m["images"] if e["orientation"] != 1)
    p = m["params"]
    return (f"{len(m['images'])} JPEGs (quality {p['quality']}) from {m['sources']} dev images: "
            f"{', '.join(parts)}; {portraits} portrait with EXIF orientation 6; "
            f"stamp {m['stamp']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--noise", type=float, default=6.0)
    ns = ap.parse_args()
    folder = ensure_corpus(ns.images, quality=ns.quality, noise=ns.noise)
    print(describe(folder), file=sys.stderr)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
