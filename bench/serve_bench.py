"""``posebatch serve`` under load: requests/s and p50/p99 latency at several concurrencies, next to
``posebatch run`` images/s on the same images, on the same machine, one after the other.

    ../.venv/bin/python serve_bench.py                    # dev images, concurrency 1, 8, 32
    ../.venv/bin/python serve_bench.py --seconds 30 --serve-args "--max-wait-ms 10"

Clients are threads of this process, each with its own keep-alive HTTP session (as the SDK
holds one), posting the original API's form (``image`` = base64, URL-encoded; bodies encoded
once, before timing) with an access token from the server's token URL. Every answer is checked
(no ``error_code``; the right person count). The client shares the machine with the server, so
its CPU time is reported next to the server's.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from posebatch.devdata import dev_data_dir  # noqa: E402

CLI = [sys.executable, "-m", "posebatch.cli"]
ANALYSIS = "/rest/2.0/image-classify/v1/body_analysis"
KEY, SECRET = "bench", "bench-secret"


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png",
                                                                        ".bmp"))


def run_local(files: list[Path], copies: int, extra: list[str]) -> dict[str, Any]:
    """``posebatch run`` on ``copies`` copies of the images; img/s from its own timer."""
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in", Path(tmp) / "out"
        for n in range(copies):
            for i, f in enumerate(files):
                dst = src / f"c{n}" / f"{i:03d}{f.suffix}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        cmd = [*CLI, "run", str(src), "--out", str(out), "--no-progress", *extra]
        started = time.monotonic()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.monotonic() - started
    m = re.search(r"(\d+) images.*\(([\d.]+) img/s\)", proc.stdout)
    assert m, proc.stdout
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {"images": int(m.group(1)), "img_per_s": float(m.group(2)), "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 1), "img_per_cpu_s": round(int(m.group(1)) / cpu, 2),
            "command": " ".join(["posebatch", *cmd[3:]])}


class Server:
    def __init__(self, args: list[str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "POSEBATCH_API_KEYS": f"{KEY}:{SECRET}"}
        self.cmd = [*CLI, "serve", "--port", str(self.port), *args]
        fd, self.log = tempfile.mkstemp(prefix="serve-bench-", suffix=".log")
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve exited: {Path(self.log).read_text()}")
            try:
                if requests.get(self.base + "/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        params = {"grant_type": "client_credentials", "client_id": KEY, "client_secret": SECRET}
        self.token = requests.get(self.base + "/oauth/2.0/token", params=params,
                                  timeout=10).json()["access_token"]

    def batches(self) -> tuple[float, float]:
        text = requests.get(self.base + "/metrics", timeout=10).text
        vals = dict(line.rsplit(" ", 1) for line in text.splitlines()
                    if line.startswith("posebatch_serve_batch_size_"))
        return (float(vals["posebatch_serve_batch_size_count"]),
                float(vals["posebatch_serve_batch_size_sum"]))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def load_level(server: Server, bodies: list[tuple[bytes, int]], concurrency: int,
               seconds: float) -> dict[str, Any]:
    url = f"{server.base}{ANALYSIS}?access_token={server.token}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = [0.0]
    warmed = threading.Barrier(concurrency + 1)
    go = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        i = n
        mine: list[float] = []
        # One warm-up request per client: connection set-up is not what we measure.
        session.post(url, data=bodies[i % len(bodies)][0], headers=headers, timeout=120)
        warmed.wait()
        go.wait()
        while time.monotonic() < stop_at[0]:
            body, persons = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            r = session.post(url, data=body, headers=headers, timeout=120).json()
            mine.append(time.perf_counter() - t0)
            if r.get("error_code") or r.get("person_num") != persons:
                with lock:
                    errors.append(json.dumps(r)[:200])
            i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    warmed.wait()  # every client has its connection and one answer
    batches0 = server.batches()
    cpu0 = proc_cpu_seconds(server.proc.pid), time.process_time()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    server_cpu = proc_cpu_seconds(server.proc.pid) - cpu0[0]
    calls, imgs = (a - b for a, b in zip(server.batches(), batches0, strict=True))
    lat = sorted(latencies) or [float("nan")]
    return {
        "concurrency": concurrency, "requests": len(lat), "seconds": round(wall, 2),
        "req_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 1),
        "mean_batch": round(imgs / calls, 2) if calls else None,
        "server_cpu_s": round(server_cpu, 1),
        "req_per_server_cpu_s": round(len(latencies) / server_cpu, 2) if server_cpu else None,
        "client_cpu_s": round(time.process_time() - cpu0[1], 1),
        "errors": len(errors), "error_examples": errors[:3],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-dir", type=Path, help="images (default: the dev set's images)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--seconds", type=float, default=20.0, help="per concurrency level")
    ap.add_argument("--run-copies", type=int, default=8,
                    help="copies of the images for `posebatch run` (default 8)")
    ap.add_argument("--serve-args", default="", help="extra flags for `posebatch serve`")
    ap.add_argument("--run-args", default="", help="extra flags for `posebatch run`")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ns = ap.parse_args()

    folder = ns.images_dir or (dev_data_dir() or Path("missing")) / "images"
    files = image_files(folder)
    if not files:
        raise SystemExit(f"no images in {folder}; pass --images-dir or set POSEBATCH_DEV_DATA")
    log(f"{len(files)} images from {folder}")

    log("posebatch run ...")
    local = run_local(files, ns.run_copies, ns.run_args.split())
    log(f"posebatch run: {local['img_per_s']} img/s on {local['images']} images")

    server = Server(ns.serve_args.split())
    try:
        # Expected person counts from the server itself (each body checked on every request).
        url = f"{server.base}{ANALYSIS}?access_token={server.token}"
        bodies = []
        for f in files:
            body = urllib.parse.urlencode(
                {"image": base64.b64encode(f.read_bytes()).decode()}).encode()
            first = requests.post(url, data=body, timeout=120, headers={
                "Content-Type": "application/x-www-form-urlencoded"}).json()
            assert "error_code" not in first, (f, first)
            bodies.append((body, first["person_num"]))
        levels = []
        for c in (int(x) for x in ns.concurrency.split(",")):
            log(f"concurrency {c} for {ns.seconds:g} s ...")
            levels.append(load_level(server, bodies, c, ns.seconds))
            log(json.dumps(levels[-1]))
    finally:
        server.stop()

    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": {"cpu": cpu_model(), "cores": os.cpu_count(), "loadavg_end": os.getloadavg(),
                 "note": "shared machine: other processes ran during the measurement"},
        "images": {"folder": str(folder), "count": len(files)},
        "serve_command": " ".join(["posebatch", *server.cmd[3:]]),
        "bench_command": " ".join(["python", "bench/serve_bench.py", *sys.argv[1:]]),
        "run": local, "serve": levels,
    }
    ns.out.mkdir(parents=True, exist_ok=True)
    stem = ns.out / f"{datetime.now(UTC):%Y-%m-%d}-{platform.node() or 'host'}-serve"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    log(f"written {stem}.json and .md")
    return 0


def markdown(r: dict[str, Any]) -> str:
    rows = [f"| serve, concurrency {lv['concurrency']} | {lv['req_per_s']} req/s | "
            f"{lv['req_per_server_cpu_s']} | {lv['p50_ms']} | {lv['p99_ms']} | "
            f"{lv['mean_batch']} | {lv['requests']} | {lv['errors']} | "
            f"{lv['server_cpu_s']} / {lv['client_cpu_s']} |"
            for lv in r["serve"]]
    return "\n".join([
        f"# posebatch serve bench, {r['date']}",
        "",
        f"Host: {r['host']['cpu']}, {r['host']['cores']} cores ({r['host']['note']}; load "
        f"average at the end {', '.join(f'{x:.1f}' for x in r['host']['loadavg_end'])}).",
        f"Images: {r['images']['count']} from {r['images']['folder']}.",
        f"Command: `{r['bench_command']}`; server: `{r['serve_command']}`; "
        f"run: `{r['run']['command']}`.",
        "",
        "Per CPU-second: images (or requests) per second of CPU the process itself used; less "
        "distorted by other load on a shared machine than per wall-second. `run`'s includes its "
        "start-up and model load.",
        "",
        "| | throughput | per CPU-s | p50 ms | p99 ms | mean batch | requests | errors | "
        "CPU s server / client |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| `posebatch run` ({r['run']['images']} images) | {r['run']['img_per_s']} img/s | "
        f"{r['run']['img_per_cpu_s']} | | | | | | {r['run']['cpu_s']} |",
        *rows, "",
    ])


if __name__ == "__main__":
    sys.exit(main())
