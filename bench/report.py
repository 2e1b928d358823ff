"""The markdown table of one bench run, and the ratios it headlines."""

from __future__ import annotations

from typing import Any

from common import GOALS


def ratio(x: float | None, y: float | None) -> float | None:
    return None if not x or not y else x / y


def fmt(v: float | None, nd: int = 1) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render(r: dict[str, Any]) -> str:
    lines = [*header_lines(r), "", *headline_lines(r["headline"]), "",
             "## Throughput", "",
             "| measurement | images/s | vs (a) | notes |", "| --- | --- | --- | --- |",
             *throughput_rows(r), "", *size_lines(r), *memory_lines(r), *compute_lines(r)]
    if r.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()]
    return "\n".join(lines) + "\n"


def size_lines(r: dict[str, Any]) -> list[str]:
    """(b) against (d) per image size, from the same run."""
    sizes = r.get("by_size") or {}
    if not sizes:
        return []
    lines = ["## By image size", "",
             "| size | images | (b) `posebatch run` img/s | (d) Ultralytics img/s (faster) | b/d |",
             "| --- | --- | --- | --- | --- |"]
    for name, v in sizes.items():
        b = (v.get("b") or {}).get("img_per_s")
        d = max((p["img_per_s"] for p in (v.get("d") or {}).values()), default=None)
        lines.append(f"| {name} | {v['images']} | {fmt(b)} | {fmt(d)} | "
                     f"{fmt(ratio(b, d), 2)} |")
    return [*lines, ""]


def throughput_rows(r: dict[str, Any]) -> list[str]:
    """One table row per measurement, with its rate relative to (a), the model alone."""
    m, s = r["machine"], r["settings"]
    a = r.get("a", {})
    rows = []
    a_rate = a.get("img_per_s")

    def row(name: str, rate: float | None, notes: str, runs: list | None = None) -> None:
        if runs and len(runs) > 1:
            notes += f"; best of {len(runs)} runs: {runs} img/s"
        rows.append(f"| {name} | {fmt(rate)} | {fmt(ratio(rate, a_rate), 2)} | {notes} |")

    if a:
        row(f"(a) model alone, backend {s.get('backend', 'ort')}: {a.get('provider')}, "
            f"batch {s['batch_size']}", a_rate,
            f"start {fmt(a['start'])} / end {fmt(a['end'])} img/s (the faster used); "
            + ", ".join(f"{k}: {v:.1f}" for k, v in a["per_shape"].items()))
    for name, ab in (r.get("a_backends") or {}).items():
        if ab:
            row(f"model alone, backend {name}, batch {s['batch_size']}", ab["img_per_s"],
                f"{ab['provider']}; " + ", ".join(f"{k}: {v:.1f}"
                                                  for k, v in ab["per_shape"].items()))
    d = r.get("decode")
    if d:
        row(f"decode only: validate+decode+letterbox+tensor, {d['threads']} threads",
            d["img_per_s"], f"1 thread: {d['img_per_s_1_thread']:.1f} img/s; per image: "
            + "; ".join(f"{k} decode {v['decode_ms']} ms, letterbox {v['letterbox_ms']} ms, "
                        f"tensor {v['tensor_ms']} ms" for k, v in d["stages_ms"].items()))
    cores = m["cores_usable"]
    if a and d and a.get("cpu_ms_per_image"):
        # On a CPU-only machine model and decoding share the cores: (b) cannot beat this.
        cpu_ms = a["cpu_ms_per_image"] + d["ms_per_image_1_thread"]
        r["cpu_bound_ceiling"] = 1e3 * cores / cpu_ms
        row(f"CPU-bound ceiling for (b) on {cores} cores", r["cpu_bound_ceiling"],
            f"cores / (model {a['cpu_ms_per_image']:.1f} + decode "
            f"{d['ms_per_image_1_thread']:.1f} CPU ms per image): what (b) could reach if "
            "nothing else were lost; the ratio column is its b/a limit")
    b = r.get("b")
    if b:
        row("(b) `posebatch run` end to end", b["img_per_s"],
            f"{b['ok']} ok / {b['failed']} failed, {b['persons']} valid persons; its own "
            f"timer {b['seconds']:.1f} s; process wall incl. start-up and model load "
            f"{b['wall_s']:.1f} s = {b['img_per_s_wall']:.1f} img/s; CPU {b['cpu_s']:.1f} s "
            f"= {b['cores_busy']:.2f} cores busy", b.get("all_img_per_s"))
    c = r.get("c")
    if c:
        row("(c) cluster: S3 + Redis + 1 worker, submit -> done", c["img_per_s"],
            f"{c['done']} done / {c['failed']} failed in {c['tasks']} tasks of "
            f"{s['task_images']}; {c['seconds']:.1f} s (submit {c['submit_s']:.1f} s; "
            f"`posebatch wait` returned at {c['wait_cli_s']:.1f} s); CPU s in that time: "
            + ", ".join(f"{k} {v}" for k, v in c["cpu_s_by_process"].items()),
            c.get("all_img_per_s"))
        if c.get("steady_img_per_s"):
            row("(c) cluster, steady state: first task's records -> last task's",
                c["steady_img_per_s"],
                f"without the job's fixed costs (submit command, listing, the first task "
                f"until its records at {c['first_done_s']:.1f} s, finalizing); the ratio a "
                "job of millions of images approaches")
    for name, p in (r.get("d") or {}).items():
        ms = p["ms_per_image"]
        row(f"(d) Ultralytics predict ({name}: torch threads {p['torch_threads']})",
            p["img_per_s"], f"{p['persons']} persons (conf {s['det_conf']}); its own ms/img: "
            f"pre {ms['preprocess']:.1f}, infer {ms['inference']:.1f}, post "
            f"{ms['postprocess']:.1f} (image reading not included there)",
            p.get("all_img_per_s"))
    return rows


def goal(key: str, value: float | None, fmt_nd: int = 2, le: bool = False) -> str:
    if value is None:
        return f"| {key} | - | {GOALS[key]} | not measured |"
    ok = value <= GOALS[key] if le else value >= GOALS[key]
    sign = "<=" if le else ">="
    return (f"| {key} | {value:.{fmt_nd}f} | {sign} {GOALS[key]} | "
            f"{'met' if ok else 'missed'} |")


def header_lines(r: dict[str, Any]) -> list[str]:
    """Machine, software, settings, model, corpus and the load other processes put on it."""
    m, s, a = r["machine"], r["settings"], r.get("a", {})
    return [
        f"# posebatch benchmark, {r['date']} on {m['host']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['mem_gb']} GB, kernel {m['kernel']}; extensions: "
        f"{' '.join(m.get('matrix_extensions') or []) or '-'}",
        f"- software: Python {m['python']}, onnxruntime {m['onnxruntime']}, openvino "
        f"{m.get('openvino') or '-'} "
        f"({a.get('provider', '?')}), numpy {m['numpy']}, Pillow {m['pillow']}"
        + (f"; peer: torch {r['peer_versions']['torch']}, ultralytics "
           f"{r['peer_versions']['ultralytics']}" if r.get("peer_versions") else ""),
        f"- settings: batch size {s['batch_size']}, intra threads {s['intra_threads']} "
        f"(0 = ONNX Runtime's default), io threads {s['io_threads']}, providers "
        f"{s['providers']}, backend {s.get('backend')} {s.get('precision')}, "
        f"imgsz {s['imgsz']}, rect {s['rect']}, det_conf {s['det_conf']}, "
        f"nms_iou {s['nms_iou']}, cluster task size {s['task_images']} images",
        f"- model: {r['model']['path']} (sha256 {r['model']['sha256'][:12]})",
        f"- corpus: {r['corpus']['description']}",
        "- input shapes (h x w: images): "
        + ", ".join(f"{k}: {v}" for k, v in r["corpus"]["shapes"].items()),
        "",
        f"- load average at start {r['loadavg_at_start']:.2f}; CPU cores kept busy by other "
        "processes during each stage: "
        + (", ".join(f"{k} {v}" for k, v in r["background_cores"].items()) or "-"),
    ]


def headline_lines(h: dict[str, Any]) -> list[str]:
    return [
        "## Headline",
        "",
        "| ratio | value | goal | |",
        "| --- | --- | --- | --- |",
        goal("b/a", h["b/a"]),
        goal("c/a", h["c/a"]),
        goal("b/d", h["b/d"]),
        goal("worker_rss_mb", h["worker_rss_mb"], 0, le=True),
        "",
        "b/d uses the faster of the peer's runs. worker_rss_mb: peak RSS of the worker's pool "
        "process (the one holding the model), VmHWM.",
    ]


def memory_lines(r: dict[str, Any]) -> list[str]:
    b, c = r.get("b"), r.get("c")
    lines = ["## Memory (peak)", ""]
    if b:
        lines.append(f"- `posebatch run` process: {b['peak_rss_mb']:.0f} MB RSS")
    if c:
        lines.append(
            f"- cluster worker: pool process {c['worker_child_peak_rss_mb']:.0f} MB RSS (VmHWM),"
            f" Celery parent {c['worker_parent_peak_rss_mb']:.0f} MB; sampled sum "
            f"{c['worker_tree_peak_rss_sum_mb']:.0f} MB RSS; at the end "
            f"{c['worker_tree_pss_end_mb']:.0f} MB PSS (shared pages counted once)")
    for name, p in (r.get("d") or {}).items():
        lines.append(f"- Ultralytics peer ({name}): {p['peak_rss_mb']:.0f} MB RSS")
    return lines


def compute_lines(r: dict[str, Any]) -> list[str]:
    """What share of the machine's measured matmul peak each stage used."""
    g = r.get("gflops", {})
    lines: list[str] = []
    if g:
        probe = r["gflops_probe"]
        lines += [
            "",
            "## Compute",
            "",
            f"- machine, float32 matmul 2048x2048 (numpy, best of 2 s): "
            f"{probe['1 thread']} GFLOP/s on 1 thread, {probe['all cores']} GFLOP/s on all "
            "cores",
            f"- model: {g['mean_per_image']:.2f} GFLOPs per image over this shape mix "
            f"({', '.join(f'{k}: {v:.2f}' for k, v in g['per_shape'].items())}); source: "
            f"{g['source']}",
        ]
        for key, label in (("a", "(a)"), ("b", "(b)"), ("c", "(c)")):
            rate = (r.get(key) or {}).get("img_per_s")
            if rate:
                achieved = rate * g["mean_per_image"]
                lines.append(f"- {label}: {achieved:.0f} GFLOP/s = "
                             f"{100 * achieved / probe['all cores']:.0f}% of the matmul probe")
    return lines
