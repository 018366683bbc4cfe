"""Process-level measurement: wall time, CPU time and peak RSS of one child process.

Every tool (drmerge, the dense baseline, mergekit) runs as its own fresh process so
that its peak RSS (``ru_maxrss`` from ``wait4``) is its own and nothing is shared or
cached in memory between them. All get the same environment (``BENCH_ENV``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
import time

# GNU OpenMP threads spin while waiting by default; on a shared, oversubscribed machine
# that turns LAPACK calls (eigh, SVD) into 2-5x slowdowns for everyone. Every tool gets
# the same passive policy so that timings measure the algorithms, not the spinning.
BENCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1"}


def run(cmd: list[str], label: str, timeout: float = 3600, cwd: str | None = None, log=print) -> dict:
    """Run ``cmd`` to completion; its wall time, CPU time, peak RSS and last JSON stdout line."""
    env = {**os.environ, **BENCH_ENV}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd, text=True)
    chunks: dict[str, list[str]] = {"out": [], "err": []}
    readers = [threading.Thread(target=lambda s=s, k=k: chunks[k].append(s.read()), daemon=True)
               for s, k in ((p.stdout, "out"), (p.stderr, "err"))]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
        _, status, ru = os.wait4(p.pid, 0)  # the child's own rusage, not the sum of all children
    finally:
        timer.cancel()
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    out, err = "".join(chunks["out"]), "".join(chunks["err"])
    if p.returncode != 0:
        raise RuntimeError(f"{label} failed (rc {p.returncode}):\n{err[-4000:]}")
    res = {"label": label, "cmd": " ".join(cmd), "wall_s": round(wall, 2),
           "cpu_s": round(ru.ru_utime + ru.ru_stime, 2), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
           "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
           "stdout_json": _last_json(out)}
    log(f"    {label}: wall {res['wall_s']:.1f}s  cpu {res['cpu_s']:.1f}s  "
        f"peak RSS {res['peak_rss_mb']:.0f} MB  (load {load0:.1f})")
    return res


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    import torch

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "env": BENCH_ENV, "argv": " ".join(sys.argv)}
