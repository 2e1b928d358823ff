"""Process accounting from /proc: CPU seconds, peak RSS/PSS of a process tree, the machine's
busy time (so figures say how loaded the machine was)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------- memory


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and PPid of one process, from /proc."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "PPid"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return out


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes (their live threads included), from /proc/<pid>/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass
    return total / tick


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have been busy (non-idle), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """This process's CPU seconds plus those of every child it has reaped (and theirs)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            ppid = proc_status(int(name)).get("PPid")
            if ppid is not None:
                children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class RssSampler:
    """Samples the summed VmRSS of a process and its descendants every ``interval`` seconds.

    Only /proc/<pid>/status (cheap): reading smaps_rollup (PSS) takes the target's mmap lock and
    measurably slowed a 3 GB torch process when sampled, so PSS is read once, by ``pss_now``.
    """

    def __init__(self, root_pid: int, interval: float = 0.25) -> None:
        self.root, self.interval = root_pid, interval
        self.peak_rss_sum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        rss = sum(proc_status(p).get("VmRSS", 0) for p in process_tree(self.root))
        self.peak_rss_sum = max(self.peak_rss_sum, rss)

    def pss_now(self) -> int:
        return sum(_pss_kb(p) for p in process_tree(self.root))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_measured(cmd: list[str], *, env: dict[str, str], cwd: Path, work: Path,
                 timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd``; return its exit code, output, wall seconds, CPU seconds and peak RSS (MB).

    Peak RSS and CPU are the child's own rusage from wait4(): exact, and nothing sampled."""
    out_path, err_path = work / "cmd.stdout", work / "cmd.stderr"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "stdout": out_path.read_text(),
            "stderr": err_path.read_text(), "wall": wall,
            "cpu": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}
