"""Export and report cost at scale, without a model: a synthetic finished job of N images.

Every result is a copy of one of the dev set's real results (so persons per image vary as in the
dev set), under N keys; the images are symlinks to the dev images. Each format and the report then
run as a user runs them, under /usr/bin/time for wall time and peak RSS.

Usage: .venv/bin/python bench/export_scale.py OUT_WITH_DEV_RESULTS N [WORKDIR]
(OUT_WITH_DEV_RESULTS: the output of `posebatch run <dev images> --out ...`.)
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


def synthesize(dev_out: Path, n: int, work: Path) -> Path:
    summary = json.loads((dev_out / "_summary.json").read_text())
    with open(dev_out / "_counts.csv", encoding="utf-8-sig", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    src, out = work / "in", work / "out"
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True)
    src.mkdir()
    new_rows = []
    for i in range(n):
        row = rows[i % len(rows)]
        key = f"d{i // 1000:03d}/{i:07d}_{os.path.basename(row['key'])}"
        (out / key).parent.mkdir(exist_ok=True)
        (src / key).parent.mkdir(exist_ok=True)
        shutil.copyfile(dev_out / (row["key"] + ".json"), out / (key + ".json"))
        os.symlink(Path(summary["input"]) / row["key"], src / key)
        new_rows.append({**row, "key": key})
    with open(out / "_counts.csv", "w", encoding="utf-8-sig", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\r\n")
        w.writeheader()
        w.writerows(new_rows)
    summary.update(input=str(src), output=str(out), images_seen=n, succeeded=n)
    (out / "_summary.json").write_text(json.dumps(summary, indent=2))
    return out


def timed(cmd: list[str]) -> tuple[float, int]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    h, m, s = wall.groups()
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return int(h or 0) * 3600 + int(m) * 60 + float(s), rss // 1024


def main() -> None:
    dev_out, n = Path(sys.argv[1]), int(sys.argv[2])
    work = Path(sys.argv[3] if len(sys.argv) > 3 else "/tmp/posebatch-export-scale")
    out = synthesize(dev_out, n, work)
    cli = [sys.executable, "-m", "posebatch.cli"]
    print(f"{n} images ({out})")
    for fmt in ("coco", "yolo", "cvat", "labelstudio"):
        dest = work / fmt
        wall, rss = timed([*cli, "export", str(out), "--format", fmt, "--to", str(dest),
                           "--no-images" if fmt in ("yolo", "cvat") else "--force"])
        print(f"export {fmt:<12} {wall:7.1f} s  {n / wall:7.0f} img/s  peak RSS {rss} MB")
    wall, rss = timed([*cli, "report", str(out), "--to", str(work / "report")])
    print(f"report              {wall:7.1f} s  {n / wall:7.0f} img/s  peak RSS {rss} MB")


if __name__ == "__main__":
    main()
