"""Print the markdown tables of bench/README.md from bench/results/*.json:
``python -m bench.report [results_dir]``."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(d: str, name: str):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def _pair_rows(title: str, res: dict, a: str, b: str) -> list[str]:
    w, c, r = res["median_wall_s"], res["median_cpu_s"], res["median_peak_rss_mb"]
    e = res.get("median_engine_s", {})
    return [f"| {title} | {a}: {w[a]:.1f} s wall, {c[a]:.1f} s CPU, {r[a]:.0f} MB"
            f"{f', engine {e[a]:.1f} s' if e else ''} | drmerge: {w[b]:.1f} s wall, {c[b]:.1f} s CPU, {r[b]:.0f} MB"
            f"{f', engine {e[b]:.1f} s' if e else ''} | wall {w['ratio']:.2f}x, CPU {c['ratio']:.2f}x, "
            f"engine {e.get('ratio', float('nan')):.2f}x, peak RSS {r['ratio']:.2f}x |"]


def main(d: str) -> None:
    print("| comparison | baseline | drmerge | ratio (drmerge / baseline) |\n|---|---|---|---|")
    for wl in ("w1", "w2"):
        data = _load(d, f"{wl}.json")
        if not data:
            continue
        for key in ("drm_vertical", "drm_horizontal"):
            if key in data:
                print("\n".join(_pair_rows(f"{wl.upper()} DRM {key.split('_')[1]}", data[key], "dense", "drmerge")))
        for key in ("ties", "task_arithmetic"):
            if key in data:
                print("\n".join(_pair_rows(f"{wl.upper()} {key}", data[key], "mergekit", "drmerge")))
    print()
    for wl in ("w1", "w2"):
        data = _load(d, f"{wl}.json") or {}
        for key in ("drm_vertical", "drm_horizontal"):
            if key in data:
                print(f"\n{wl.upper()} {key} errors vs float64 (relative Frobenius, merged delta):\n")
                print("| tensor | drmerge engine | dense float32 SVD | drmerge output file | dense output file |\n|---|---|---|---|---|")
                for row in data[key]["errors"]:
                    print(f"| {row['tensor']} {row['shape']} | {row['engine_vs_f64']:.2e} | {row['dense_f32_svd_vs_f64']:.2e} "
                          f"| {row.get('drmerge_output_file_vs_f64', float('nan')):.2e} | {row.get('dense_output_file_vs_f64', float('nan')):.2e} |")
                st = data[key]["stages"][0]
                print(f"\ndrmerge stages: {st}; dense stages: {data[key]['dense_stages'][0]}")
        for key in ("ties", "task_arithmetic"):
            if key in data:
                print(f"\n{wl.upper()} {key} vs mergekit agreement: {data[key]['agreement']}")
    sc = _load(d, "scaling.json")
    if sc:
        print("\n| T | n x m | Gram side | dense CPU s | drmerge CPU s | CPU ratio | dense wall s | drmerge wall s | dense extra MB | drmerge extra MB |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in sc["rows"]:
            print(f"| {r['T']} | {r['n']}x{r['m']} | {r['gram_side']} | {r['dense'].get('cpu_s', float('nan')):.1f} | "
                  f"{r['drmerge'].get('cpu_s', float('nan')):.1f} | {r.get('cpu_ratio', float('nan')):.2f} | "
                  f"{r['dense']['seconds']:.1f} | {r['drmerge']['seconds']:.1f} "
                  f"| {r['dense']['extra_peak_mb']:.0f} | {r['drmerge']['extra_peak_mb']:.0f} |")
    for name in sorted(os.listdir(d)):
        if name.startswith("overlap"):
            data = _load(d, name)
            print(f"\n{name}: storage {data['storage']}")
            print("| method | I/O alone s | compute alone s | end to end s | e2e / max | stages |\n|---|---|---|---|---|---|")
            for r in data["results"]:
                print(f"| {r['method']} | {r['io_alone']['seconds']:.1f} | {r['compute_alone']['seconds']:.1f} | "
                      f"{r['end_to_end']['seconds']:.1f} | {r['ratio_e2e_over_max']:.2f} | {r['end_to_end']['timings']} |")
        if name.startswith("big"):
            data = _load(d, name)
            r = data["run"]
            print(f"\n{name}: {data['workload']['bytes_per_model'] / 1e9:.2f} GB per checkpoint, peak RSS "
                  f"{r['peak_rss_mb']:.0f} MB (limit 1500), wall {r['wall_s']:.0f}s; cmd: {r['cmd']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "results"))
