"""DRM time and peak memory vs number of models and vs matrix size:
``python -m bench.run --workload scaling``.

Under a loaded machine wall seconds mostly measure the scheduler; the CPU seconds of
the merge (``cpu_s``, both on the same thread count) are the stable comparison.
Each point runs in its own process: the deltas are generated (bench.synth), the peak-RSS
mark is reset (/proc/self/clear_refs), then one matrix is merged, by drmerge's
``drm_matrix_delta`` and by the dense float32 SVD of the stack. Reported: seconds and the
extra peak memory over the inputs already in memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from . import measure

POINTS = [  # (T, n, m): models vs size
    (2, 768, 3072), (4, 768, 3072), (8, 768, 3072),
    (4, 512, 512), (4, 1024, 1024), (4, 2048, 2048),
]


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def point(t: int, n: int, m: int, who: str) -> dict:
    import torch

    from .synth import task_deltas

    deltas = task_deltas((n, m), t, seed=n + m + t)
    _reset_hwm()
    before = _hwm_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    if who == "drmerge":
        from drmerge.methods.drm import DrmParams, drm_matrix_delta

        drm_matrix_delta(deltas, torch.ones(t), DrmParams())
    else:
        from .baselines.dense_drm import drm_dense

        drm_dense(deltas)
    return {"seconds": round(time.perf_counter() - t0, 3), "cpu_s": round(time.process_time() - c0, 3),
            "extra_peak_mb": round(_hwm_mb() - before, 1),
            "inputs_mb": round(deltas.numel() * 4 / 2**20, 1)}


def main(args) -> None:
    from .run import save

    rows = []
    for t, n, m in POINTS:
        row = {"T": t, "n": n, "m": m, "gram_side": min(t * n, m)}
        for who in ("dense", "drmerge"):
            r = measure.run([sys.executable, "-m", "bench.scaling", str(t), str(n), str(m), who],
                            f"scaling T={t} {n}x{m} {who}", log=print)
            row[who] = r["stdout_json"]
        row["time_ratio"] = round(row["drmerge"]["seconds"] / row["dense"]["seconds"], 3)
        row["cpu_ratio"] = round(row["drmerge"]["cpu_s"] / row["dense"]["cpu_s"], 3)
        row["memory_ratio"] = round(row["drmerge"]["extra_peak_mb"] / max(row["dense"]["extra_peak_mb"], 1e-9), 3)
        rows.append(row)
        save("scaling", {"machine": measure.machine(), "rows": rows})


if __name__ == "__main__":
    t, n, m, who = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(json.dumps(point(t, n, m, who)))
