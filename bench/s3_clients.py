"""What one S3 GET and PUT cost the worker's CPU: boto3 (pool sizes) against obstore (issue 20).

Why: a GPU worker at 2,800 img/s makes 2,800 GETs and 2,800 PUTs a second from Python threads
that share the GIL with the model's thread; the client's Python per request is host-side cost
like decoding. This starts SeaweedFS on loopback, writes ``--n`` objects of ``--kb`` KB and
times GETs (and PUTs of 1 KB results) from ``--threads`` threads with each client, reporting
requests/s and this process's CPU ms per request (the server's CPU is not counted). obstore (a
Rust object-store client, ``pip install obstore``) is measured when installed.

    python bench/s3_clients.py [--n 2000] [--kb 60] [--threads 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def boto3_client(server, pool: int):  # noqa: ANN001, ANN201
    return server.client(max_pool_connections=pool)


def timed(fn, items, threads: int) -> tuple[float, float]:  # noqa: ANN001
    """(requests/s, CPU ms per request of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(fn, items):
            pass
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(items) / wall, cpu / len(items) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--kb", type=int, default=60, help="object size (a 640x360 JPEG is ~60 KB)")
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds, best kept")
    ns = ap.parse_args()
    from posebatch.testing.servers import running_s3

    body, result = b"x" * (ns.kb * 1024), b"{}" * 512
    keys = [f"in/{i:06d}.jpg" for i in range(ns.n)]
    with tempfile.TemporaryDirectory() as tmp, running_s3(Path(tmp)) as server:
        bucket = server.make_bucket("bench")
        setup = server.client(max_pool_connections=32)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda k: setup.put_object(Bucket=bucket, Key=k, Body=body), keys))
        clients = {f"boto3 pool {p}": boto3_client(server, p) for p in (10, 64)}

        def boto_ops(c):  # noqa: ANN001, ANN202
            return (lambda k: c.get_object(Bucket=bucket, Key=k)["Body"].read(),
                    lambda k: c.put_object(Bucket=bucket, Key=k + ".json", Body=result))

        ops = {name: boto_ops(c) for name, c in clients.items()}
        try:
            import obstore
            from obstore.store import S3Store

            store = S3Store(bucket, endpoint=server.endpoint, access_key_id=server.access_key,
                            secret_access_key=server.secret_key, region=server.region,
                            client_options={"allow_http": True, "pool_max_idle_per_host": "64"})
            ops["obstore"] = (lambda k: obstore.get(store, k).bytes(),
                              lambda k: obstore.put(store, k + ".json", result))
        except ImportError:
            print("obstore not installed: boto3 only")
        best: dict[str, list[tuple[float, float]]] = {}
        for _ in range(ns.rounds):
            for name, (get, put) in ops.items():
                g, p = timed(get, keys, ns.threads), timed(put, keys, ns.threads)
                prev = best.get(name)
                best[name] = [max(a, b) if prev else a for a, b in
                              zip([g, p], prev or [g, p], strict=True)]
        print(f"{ns.n} objects of {ns.kb} KB, {ns.threads} threads, best of {ns.rounds}")
        for name, ((g_rate, g_cpu), (p_rate, p_cpu)) in best.items():
            print(f"{name:14s} GET {g_rate:7.0f}/s {g_cpu:5.2f} ms CPU   "
                  f"PUT {p_rate:7.0f}/s {p_cpu:5.2f} ms CPU")


if __name__ == "__main__":
    main()
