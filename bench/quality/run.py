"""Merge-quality benchmark: fine-tune one encoder on six tasks, merge, score every task.

    python -m bench.quality.run                 # full run, writes bench/quality/RESULTS.md
    python -m bench.quality.run --smoke --out /tmp/q   # tiny end-to-end check (CI)
    python -m bench.quality.run --regime headline      # the headline regime (bench/quality/headline.py)

This module is the ``small`` (small-deltas) regime, the default of ``--regime``; the
``headline`` and ``lora`` regimes live in ``headline.py`` and share its worker functions.

Protocol (the paper's, in miniature):
1. Six tasks (bench/quality/data.py), fixed class-balanced splits from ``--data-seed``.
2. Per seed: all-MiniLM-L6-v2 fully fine-tuned on each task with its own linear head.
3. Every method merges the six fine-tuned encoders through ``drmerge.merge`` (the
   engine's public API; each merge is a real checkpoint on disk that transformers loads).
   Heads are not merged: each task is scored with its own fine-tuned head on the
   merged encoder.
4. Hyperparameters (scale, and drop rate or density) are chosen per method on a
   validation subset by average normalized accuracy (merged / fine-tuned); each chosen
   configuration is then scored once on test.

Work is spread over ``--jobs`` single-threaded worker processes: on a shared 2-core box
one process per core is several times faster than one process with two OpenMP threads
fighting other load. Everything expensive is cached in ``--work`` (fine-tuned
checkpoints, every evaluation), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------- profiles

def _grid(direction=None, drops=(), scales=(), renormalize=True):
    out = []
    for p in drops:
        for s in scales:
            d = {"direction": direction, "drop_rate": p, "scale": s}
            if not renormalize:
                d["renormalize"] = False
            out.append(d)
    return out


@dataclass
class Profile:
    tasks: tuple[str, ...]
    train: int
    val: int
    test: int
    val_select: int           # validation examples per task used for the grid search
    epochs: int
    max_len: int
    ta_scales: tuple[float, ...]
    ties_densities: tuple[float, ...]
    ties_scales: tuple[float, ...]
    drm_drops: tuple[float, ...]
    drm_scales: tuple[float, ...]
    drop_curve_on_test: bool = True
    select_ignore: tuple[str, ...] = ()  # tensors the merges copy from the base (smoke: most layers)

    def families(self) -> dict[str, tuple[str, list[dict]]]:
        """Method families with their validation grids (the ablations are derived later)."""
        return {
            "linear": ("linear", [{}]),
            "task_arithmetic": ("task_arithmetic", [{"scale": s} for s in self.ta_scales]),
            "ties": ("ties", [{"density": d, "scale": s} for d in self.ties_densities for s in self.ties_scales]),
            "drm_v": ("drm", _grid("vertical", self.drm_drops, self.drm_scales)),
            "drm_h": ("drm", _grid("horizontal", self.drm_drops, self.drm_scales)),
        }


FULL = Profile(
    tasks=("tweet_sentiment", "tweet_topic", "noun_category", "verb_category", "fortune_topic", "example_pos"),
    train=720, val=200, test=400, val_select=100, epochs=2, max_len=64,
    ta_scales=(0.2, 0.3, 0.4, 0.6, 0.8, 1.0),
    ties_densities=(0.2, 0.5), ties_scales=(0.6, 1.0, 1.4),
    # DRM merges are the slow ones (about 2.5 min each on the shared box, against 5-30 s
    # for the baselines): λ = 1.4 was dropped from their grid after it lost to 0.6 and 1.0
    # at every drop rate tried (and for TIES and task arithmetic).
    drm_drops=(0.5, 0.7, 0.8, 0.9), drm_scales=(0.6, 1.0),
    # The drop-rate curve is read on validation; only the chosen configurations are
    # scored on test (each test pass is 2,400 examples).
    drop_curve_on_test=False,
)
SMOKE = Profile(
    tasks=("verb_category", "tweet_topic"),
    train=48, val=24, test=24, val_select=12, epochs=1, max_len=32,
    ta_scales=(0.5,), ties_densities=(0.5,), ties_scales=(1.0,),
    drm_drops=(0.8,), drm_scales=(1.0,),
    # Every method still runs end to end through the engine, on layer 0 and the
    # embeddings; the other layers are copied from the base to keep CI fast.
    select_ignore=(r"encoder\.layer\.[1-9]\..*",),
)

LABELS = {
    "finetuned": "Fine-tuned (one model per task)",
    "probe": "Pretrained + linear probe (floor)",
    "pretrained_ft_heads": "Pretrained encoder + fine-tuned heads",
    "linear": "Linear average",
    "task_arithmetic": "Task arithmetic",
    "ties": "TIES",
    "drm_v": "DRM-V",
    "drm_h": "DRM-H",
    "drm_v_no_renorm": "DRM-V, no renormalization (ablation)",
    "drm_h_no_renorm": "DRM-H, no renormalization (ablation)",
}
MERGE_ROWS = ("linear", "task_arithmetic", "ties", "drm_v", "drm_h", "drm_v_no_renorm", "drm_h_no_renorm")


def config_key(method: str, params: dict) -> str:
    return method + ":" + json.dumps(params, sort_keys=True)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- workers

_W: dict = {}


def _worker_init(encoded_path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _W["encoded"] = torch.load(encoded_path, weights_only=False)
    _W["heads"] = {}


def _head(path: str):
    from .finetune import load_head

    if path not in _W["heads"]:
        _W["heads"][path] = load_head(Path(path))
    return _W["heads"][path]


def _score(encoder, heads: dict[str, str], split: str, limit: int | None) -> dict[str, float]:
    import torch

    from .finetune import accuracy, eval_batches, features

    accs = {}
    for task, head_dir in heads.items():
        enc = _W["encoded"][task][split].subset(limit)
        feats = features(encoder, eval_batches(enc), len(enc))
        with torch.inference_mode():
            accs[task] = accuracy(_head(head_dir)(feats), enc.labels)
    return accs


def _job_finetune(job: dict) -> dict:
    """Fine-tune one task; score it on its own val subset and test split."""
    from .data import Task
    from .finetune import FinetuneConfig, finetune_task, load_encoder

    out = Path(job["out"])
    enc = _W["encoded"][job["task"]]
    task = Task(job["task"], tuple(job["labels"]), "")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    meta = finetune_task(task, enc, tmp, job["seed"], FinetuneConfig(**job["config"]),
                         log=lambda m: log(f"seed {job['seed']}{m}"))
    encoder = load_encoder(tmp)
    heads = {job["task"]: str(tmp)}
    meta["val_accuracy"] = _score(encoder, heads, "val", job["val_select"])[job["task"]]
    meta["test_accuracy"] = _score(encoder, heads, "test", None)[job["task"]]
    meta["data_sha256"] = job["data_sha256"]
    (tmp / "finetune.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return meta


def _job_merge_eval(job: dict) -> dict:
    """Merge through the engine (unless this config's merge is already on disk), load the
    result with transformers, score every task on each requested split."""
    import drmerge

    from .finetune import load_encoder

    out = Path(job["out"])
    stamp = out / "bench-config.json"
    merge_s = engine_s = 0.0
    warnings: list[str] = []
    reused = (out / "drmerge.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == job["spec"]
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        result = drmerge.merge(job["spec"], device="cpu")
        merge_s, engine_s, warnings = time.time() - t0, result.seconds, list(result.warnings)
        stamp.write_text(json.dumps(job["spec"]))
    t1 = time.time()
    encoder = load_encoder(out)
    results = []
    for split, limit in job["splits"]:
        results.append({"key": job["key"], "split": split, "accuracy": _score(encoder, job["heads"], split, limit),
                        "merge_seconds": round(merge_s, 2), "engine_seconds": round(engine_s, 2),
                        "reused_merge": reused, "warnings": warnings})
    for r in results:
        r["eval_seconds"] = round((time.time() - t1) / len(results), 2)
    if not job.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return results


def _job_base_features(job: dict) -> dict:
    """Pretrained-encoder features of every split (for the probe and the zero-merge row)."""
    from .finetune import eval_batches, features, load_encoder

    encoder = load_encoder(job["base"])
    enc = _W["encoded"][job["task"]]
    return {"task": job["task"], "features": {s: features(encoder, eval_batches(e), len(e)) for s, e in enc.items()}}


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    profile: Profile
    work: Path
    out: Path
    seeds: list[int]
    data_seed: int
    jobs: int
    threads: int
    smoke: bool
    keep_merged: bool = False
    fixed: dict | None = None  # family -> params chosen on the tuning seed
    started: float = field(default_factory=time.time)
    pool: ProcessPoolExecutor | None = None

    # -- setup
    def prepare(self):
        import torch
        from transformers import AutoTokenizer

        from . import data
        from .finetune import encode, load_encoder, pretrained_dir, save_encoder

        p = self.profile
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        log(f"building tasks {', '.join(p.tasks)} (data seed {self.data_seed})")
        sizes = data.Sizes(p.train, p.val, p.test)
        self.tasks = data.build_tasks(p.tasks, sizes, self.data_seed)
        self.manifest = data.manifest(self.tasks, self.data_seed)
        (self.out / "splits.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        self.data_sha = hashlib.sha256(json.dumps(self.manifest["tasks"], sort_keys=True).encode()).hexdigest()
        tok = AutoTokenizer.from_pretrained(str(pretrained_dir()))
        encoded = {name: {s: encode(tok, t.split(s), p.max_len) for s in ("train", "val", "test")}
                   for name, t in self.tasks.items()}
        self.encoded_path = self.work / "encoded.pt"
        tmp = self.encoded_path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(encoded, tmp)
        os.replace(tmp, self.encoded_path)
        # The merge base is the pretrained encoder re-saved through the same code path
        # as the fine-tunes, so all seven checkpoints hold the same tensor names.
        self.base = self.work / "base"
        if not (self.base / "model.safetensors").is_file():
            save_encoder(load_encoder(pretrained_dir()), self.base)
        ctx = get_context("spawn")
        self.pool = ProcessPoolExecutor(self.jobs, mp_context=ctx, initializer=_worker_init,
                                        initargs=(str(self.encoded_path), self.threads))

    def _map(self, fn, jobs: list[dict]):
        futures = [self.pool.submit(fn, j) for j in jobs]
        for f in as_completed(futures):
            yield f.result()

    # -- per seed
    def finetune(self, seed: int) -> dict[str, dict]:
        from .finetune import FinetuneConfig

        cfg = asdict(FinetuneConfig(epochs=self.profile.epochs, max_len=self.profile.max_len))
        metas, jobs = {}, []
        for name, task in self.tasks.items():
            out = self.work / f"seed{seed}" / "ft" / name
            meta_path = out / "finetune.json"
            if meta_path.is_file():
                meta = json.loads(meta_path.read_text())
                if meta.get("config") == cfg and meta.get("data_sha256") == self.data_sha and "test_accuracy" in meta:
                    metas[name] = meta
                    continue
            # A task's training seed depends on the run seed and the task, not on the cache.
            jobs.append({"task": name, "labels": list(task.labels), "out": str(out),
                         "seed": seed * 1000 + list(self.tasks).index(name),
                         "config": cfg, "val_select": self.profile.val_select, "data_sha256": self.data_sha})
        if jobs:
            # Longest first (tokens to train on), so the last task to finish is a short one:
            # with 2 workers that saves ~30 s a seed over the task order.
            train = self.encoded_lazy()
            jobs.sort(key=lambda j: -sum(len(ids) for ids in train[j["task"]]["train"].ids))
            log(f"seed {seed}: fine-tuning {len(jobs)} task(s) on {self.jobs} worker(s)")
        for meta in self._map(_job_finetune, jobs):
            metas[meta["task"]] = meta
            log(f"seed {seed}: {meta['task']} fine-tuned in {meta['train_seconds']}s, "
                f"val {meta['val_accuracy']:.3f} test {meta['test_accuracy']:.3f}")
        return {n: metas[n] for n in self.tasks}

    def references(self, seed: int, heads: dict[str, str]) -> dict:
        """Linear-probe floor and the pretrained encoder with the fine-tuned heads."""
        import torch

        from .finetune import accuracy, linear_probe, load_head

        cache = self.work / "base_features.pt"
        if cache.is_file():
            feats = torch.load(cache, weights_only=False)
        else:
            feats = {}
            for r in self._map(_job_base_features, [{"task": t, "base": str(self.base)} for t in self.tasks]):
                feats[r["task"]] = r["features"]
            torch.save(feats, cache)
        out = {"probe": {"val": {}, "test": {}, "weight_decay": {}}, "pretrained_ft_heads": {"val": {}, "test": {}}}
        vs = self.profile.val_select
        for name in self.tasks:
            f = feats[name]
            enc = self.encoded_lazy()[name]
            lin, info = linear_probe(f["train"], enc["train"].labels, f["val"], enc["val"].labels,
                                     len(self.tasks[name].labels), seed)
            head = load_head(Path(heads[name]))
            with torch.inference_mode():
                out["probe"]["val"][name] = accuracy(lin(f["val"][:vs]), enc["val"].labels[:vs])
                out["probe"]["test"][name] = accuracy(lin(f["test"]), enc["test"].labels)
                out["probe"]["weight_decay"][name] = info["weight_decay"]
                out["pretrained_ft_heads"]["val"][name] = accuracy(head(f["val"][:vs]), enc["val"].labels[:vs])
                out["pretrained_ft_heads"]["test"][name] = accuracy(head(f["test"]), enc["test"].labels)
        return out

    def encoded_lazy(self):
        if not hasattr(self, "_encoded"):
            import torch

            self._encoded = torch.load(self.encoded_path, weights_only=False)
        return self._encoded

    def spec(self, method: str, params: dict, ft_dirs: dict[str, str], out: Path) -> dict:
        spec = {"models": [{"model": ft_dirs[t]} for t in self.tasks], "method": method,
                "output": str(out), "dtype": "float32", "overwrite": True}
        if method != "linear":
            spec["base_model"] = str(self.base)
        if params:
            spec["parameters"] = dict(params)
        if self.profile.select_ignore:
            spec["select"] = {"ignore": list(self.profile.select_ignore)}
        return spec

    def evaluate(self, seed: int, configs: list[tuple[str, dict]], splits: tuple[str, ...], ft_dirs: dict[str, str],
                 cache: dict) -> dict[str, dict]:
        """Merge + score each config on ``splits``; results cached in evals.jsonl.

        Merged checkpoints stay on disk until the seed is done, so the test phase scores
        the very checkpoints that won on validation without merging them again."""
        jobs = []
        for method, params in configs:
            key = config_key(method, params)
            todo = [s for s in splits if (key, s) not in cache]
            if not todo or any(j["key"] == key for j in jobs):
                continue
            out = self.merged_dir(seed, key)
            jobs.append({"key": key, "heads": ft_dirs, "out": str(out), "keep": True,
                         "splits": [(s, self.profile.val_select if s == "val" else None) for s in todo],
                         "spec": self.spec(method, params, ft_dirs, out)})
        if jobs:
            log(f"seed {seed}: {len(jobs)} config(s) to score on {'+'.join(splits)}")
        path = self.work / f"seed{seed}" / "evals.jsonl"
        done = 0
        for results in self._map(_job_merge_eval, jobs):
            for r in results:
                r["data_sha256"] = self.data_sha
                cache[(r["key"], r["split"])] = r
                with open(path, "a") as f:
                    f.write(json.dumps(r) + "\n")
            done += 1
            r = results[0]
            if "test" in splits or done % 5 == 0 or done == len(jobs):
                log(f"seed {seed}: {done}/{len(jobs)} scored (last: {r['key']}, merge {r['merge_seconds']}s, "
                    f"eval {r['eval_seconds']}s)")
        return {s: {config_key(m, p): cache[(config_key(m, p), s)] for m, p in configs} for s in splits}

    def merged_dir(self, seed: int, key: str) -> Path:
        return self.work / f"seed{seed}" / "merged" / hashlib.sha1(key.encode()).hexdigest()[:12]

    def load_cache(self, seed: int) -> dict:
        path = self.work / f"seed{seed}" / "evals.jsonl"
        cache = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                if r.get("data_sha256") == self.data_sha:
                    cache[(r["key"], r["split"])] = r
        return cache

    def run_seed(self, seed: int) -> dict:
        t0 = time.time()
        metas = self.finetune(seed)
        ft_dirs = {t: str(self.work / f"seed{seed}" / "ft" / t) for t in self.tasks}
        ft_val = {t: metas[t]["val_accuracy"] for t in self.tasks}
        ft_test = {t: metas[t]["test_accuracy"] for t in self.tasks}
        refs = self.references(seed, ft_dirs)
        cache = self.load_cache(seed)

        def norm(accs, ref):
            return sum(accs[t] / ref[t] if ref[t] > 0 else 0.0 for t in self.tasks) / len(self.tasks)

        fams = self.profile.families()
        if self.fixed:  # hyperparameters chosen on another seed: no grid search here
            fams = {fam: (method, [self.fixed[fam]]) for fam, (method, _) in fams.items()}
            # Every configuration is known now (ablations included): score them in one batch
            # so the worker pool stays full; the calls below find them in the cache.
            self.evaluate(seed, [(fams[f][0] if f in fams else "drm", self.fixed[f]) for f in MERGE_ROWS],
                          ("val", "test"), ft_dirs, cache)
        val_configs = [(m, p) for m, grid in fams.values() for p in grid]
        # A family with a single configuration needs no selection: score it on test too now.
        single = [(m, grid[0]) for m, grid in fams.values() if len(grid) == 1]
        self.evaluate(seed, single, ("val", "test"), ft_dirs, cache)
        val = self.evaluate(seed, val_configs, ("val",), ft_dirs, cache)["val"]

        def pick(method, grid):
            scored = [(norm(val[config_key(method, p)]["accuracy"], ft_val), i, p) for i, p in enumerate(grid)]
            best = max(scored, key=lambda x: (x[0], -x[1]))
            return best[2], [{"params": p, "val_normalized": round(s, 4),
                              "val_accuracy": val[config_key(method, p)]["accuracy"]} for s, _, p in scored]

        chosen, grids = {}, {}
        for fam, (method, grid) in fams.items():
            chosen[fam], grids[fam] = pick(method, grid)
        # Ablation: DRM without renormalization at the drop rate chosen for DRM, scale re-chosen.
        abl = {}
        for fam, direction in (("drm_v", "vertical"), ("drm_h", "horizontal")):
            abl[f"{fam}_no_renorm"] = ("drm", [self.fixed[f"{fam}_no_renorm"]] if self.fixed else
                                       _grid(direction, (chosen[fam]["drop_rate"],), self.profile.drm_scales,
                                             renormalize=False))
        abl_configs = [(m, p) for m, grid in abl.values() for p in grid]
        self.evaluate(seed, [(m, g[0]) for m, g in abl.values() if len(g) == 1], ("val", "test"), ft_dirs, cache)
        val.update(self.evaluate(seed, abl_configs, ("val",), ft_dirs, cache)["val"])
        for fam, (method, grid) in abl.items():
            chosen[fam], grids[fam] = pick(method, grid)
        fams.update(abl)

        # Drop-rate curves: best scale per drop rate (on val), then scored on test.
        curves = {}
        for fam in ("drm_v", "drm_h"):
            curves[fam] = []
            for p in sorted({q["drop_rate"] for q in fams[fam][1]}):
                sub = [q for q in fams[fam][1] if q["drop_rate"] == p]
                best, _ = pick("drm", sub)
                curves[fam].append({"drop_rate": p, "params": best})
        test_configs = [(fams[f][0], chosen[f]) for f in MERGE_ROWS]
        if self.profile.drop_curve_on_test:
            test_configs += [("drm", c["params"]) for f in curves for c in curves[f]]
        test = self.evaluate(seed, test_configs, ("test",), ft_dirs, cache)["test"]
        if not self.keep_merged:
            shutil.rmtree(self.work / f"seed{seed}" / "merged", ignore_errors=True)

        rows = {"finetuned": {"test": ft_test, "val": ft_val},
                "probe": {"test": refs["probe"]["test"], "val": refs["probe"]["val"]},
                "pretrained_ft_heads": refs["pretrained_ft_heads"]}
        for f in MERGE_ROWS:
            k = config_key(fams[f][0], chosen[f])
            rows[f] = {"test": test[k]["accuracy"], "val": val[k]["accuracy"], "params": chosen[f],
                       "merge_seconds": test[k]["merge_seconds"], "warnings": test[k]["warnings"]}
        for r in rows.values():
            r["test_avg"] = sum(r["test"].values()) / len(self.tasks)
            r["test_normalized"] = norm(r["test"], ft_test)
            r["test_normalized_per_task"] = {t: r["test"][t] / ft_test[t] for t in self.tasks}
        for fam in curves:
            for c in curves[fam]:
                k = config_key("drm", c["params"])
                c["val_normalized"] = norm(val[k]["accuracy"], ft_val)
                if k in test:
                    c["test_normalized"] = norm(test[k]["accuracy"], ft_test)
        merged = {r["key"]: r["merge_seconds"] for r in cache.values() if not r.get("reused_merge")}
        merge_times = [t for t in merged.values() if t > 0]  # wall seconds of engine calls
        return {"seed": seed, "tuned": not self.fixed, "rows": rows, "grids": grids, "drop_curves": curves,
                "probe_weight_decay": refs["probe"]["weight_decay"],
                "finetune": {t: {k: metas[t][k] for k in ("train_seconds", "steps", "seed")} for t in self.tasks},
                "merges": len(merged), "merge_seconds_median": sorted(merge_times)[len(merge_times) // 2] if merge_times else None,
                "seconds": round(time.time() - t0, 1)}

    def close(self):
        if self.pool:
            self.pool.shutdown()


# ----------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--regime", choices=("small", "headline", "lora"), default="small",
                    help="small: six tasks, small deltas (this module); headline: nine tasks whose fine-tunes "
                         "are worth merging; lora: the headline tasks as LoRA adapters (bench/quality/headline.py)")
    ap.add_argument("--rows", nargs="+", default=None,
                    help="headline/lora: only these rows of the method table (bench/quality/grids.py)")
    ap.add_argument("--tasks", nargs="+", default=None,
                    help="headline/lora: only these tasks (bench/quality/tasks.py); each task's split and "
                         "fine-tunes do not depend on the others, so the cache still applies")
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (2 tasks, 1 epoch, 1 config per method)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="fine-tuning seeds (default: small 0 1, headline/lora 0 1 2; smoke: 0)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="cache folder (default bench/quality/_work[_smoke])")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md/results.json/plots go "
                    "(default bench/quality; smoke: <work>/out)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--keep-merged", action="store_true", help="keep every merged checkpoint in --work")
    ap.add_argument("--tune-seed", type=int, default=None,
                    help="run the validation grids on this seed only; the other seeds reuse its choices "
                         "(default: the first of --seeds)")
    ap.add_argument("--tune-each-seed", action="store_true",
                    help="every seed runs its own validation grids (slower: the grids are most of a seed's merges)")
    ap.add_argument("--finetune-only", action="store_true", help="fine-tune the seeds' models, then stop")
    args = ap.parse_args(argv)
    command = "python -m bench.quality.run " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.regime != "small":
        if args.tune_each_seed:
            ap.error("--tune-each-seed applies to the small regime only")
        from .headline import main as headline_main

        return headline_main(args, command)
    if args.rows or args.tasks:
        ap.error("--rows and --tasks apply to the headline and lora regimes")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    profile = SMOKE if args.smoke else FULL
    work = args.work or HERE / ("_work_smoke" if args.smoke else "_work")
    out = args.out or (work / "out" if args.smoke else HERE)
    run = Run(profile, work, out, args.seeds or ([0] if args.smoke else [0, 1]), args.data_seed, args.jobs, args.threads, args.smoke,
              args.keep_merged)
    load_start = os.getloadavg()
    try:
        run.prepare()
        if args.finetune_only:
            for s in run.seeds:
                run.finetune(s)
            return {}
        order = run.seeds
        if args.tune_each_seed:
            args.tune_seed = None
        elif args.tune_seed is None:
            args.tune_seed = run.seeds[0]
        if args.tune_seed is not None:
            if args.tune_seed not in run.seeds:
                ap.error("--tune-seed must be one of --seeds")
            order = [args.tune_seed] + [s for s in run.seeds if s != args.tune_seed]
        seeds = []
        for s in order:
            seeds.append(run.run_seed(s))
            if args.tune_seed is not None and s == args.tune_seed:
                run.fixed = {fam: row["params"] for fam, row in seeds[0]["rows"].items() if "params" in row}
        seeds.sort(key=lambda r: r["seed"])
    finally:
        run.close()
    import resource

    from .report import write_report

    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))

    meta = {
        "command": command,
        "profile": asdict(profile), "smoke": args.smoke, "seeds": run.seeds, "tune_seed": args.tune_seed, "data_seed": args.data_seed,
        "jobs": args.jobs, "threads": args.threads, "wall_seconds": round(time.time() - run.started, 1),
        "cpu_seconds_this_invocation": round(cpu, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "splits": run.manifest,
    }
    return write_report(meta, seeds, list(run.tasks), out)


if __name__ == "__main__":
    main()
