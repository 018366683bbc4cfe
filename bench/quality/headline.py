"""The headline (and LoRA) regime: nine tasks whose fine-tunes are worth merging.

    python -m bench.quality.run --regime headline            # seeds 0 1 2, grids on seed 0
    python -m bench.quality.run --regime lora                # the same tasks as LoRA adapters
    python -m bench.quality.run --regime headline --smoke    # CI: 3 tiny tasks, one point per method

Per seed: every task of ``tasks.py`` is fine-tuned (``training.py``; cached by content
hash, so a rerun of the merge part trains nothing), scored on its validation subset and
test split; the references are the linear probe of the pretrained encoder and the
pretrained encoder under the fine-tuned heads (the merge at lambda = 0); the task
vectors' relative norms and cosines are measured (``deltas.py``); then every row of the
method table (``grids.py``) merges the fine-tunes through ``drmerge.merge`` at each of its
grid points, is scored on validation, and its best point (average normalized accuracy)
once on test. Seeds other than the tuning seed reuse its choices.

Output (``--out``, default ``<work>/out``): ``<regime>.json`` with everything measured,
``<regime>.md`` (the tables that go into RESULTS.md) and ``<regime>_splits.json`` (the
SHA-256 of every split).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from . import grids as G
from .data import Sizes
from .training import TrainConfig

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Regime:
    name: str                     # "headline" | "lora"
    tasks: tuple[str, ...]
    sizes: Sizes
    val_select: int               # validation examples per task scored for the grid search
    train: TrainConfig
    smoke: bool = False
    select_ignore: tuple[str, ...] = ()   # tensors the merges copy from the base (smoke: most layers)
    output_format: str = "full"


def regime(name: str, smoke: bool = False) -> Regime:
    from .tasks import TASK_NAMES

    kind = {"headline": "full", "lora": "lora"}[name]
    if smoke:
        # Three of the cheapest tasks (short texts, pools built in well under a second).
        return Regime(name, ("bigram_shift", "misspelling", "word_count"), Sizes(64, 24, 24), 12,
                      TrainConfig(kind=kind, steps=6, batch_size=8, max_len=32,
                                  lr=2e-4 if kind == "full" else 2e-3),
                      smoke=True, select_ignore=(r"encoder\.layer\.[1-9]\..*",))
    cfg = TrainConfig(kind=kind) if kind == "full" else TrainConfig(kind=kind, lr=1e-3)
    return Regime(name, TASK_NAMES, Sizes(1200, 200, 300), 100, cfg)


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- worker jobs

def _job_train(job: dict) -> dict:
    """Fine-tune one task (full or LoRA), score it, publish it under its content hash."""
    from .data import Task
    from .run import _W, _score
    from .training import finalize, train_task

    out = Path(job["out"])
    enc = _W["encoded"][job["task"]]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    encoder, _, meta = train_task(Task(job["task"], tuple(job["labels"]), ""), enc["train"], tmp, job["seed"],
                                  TrainConfig(**job["config"]), log=lambda m: log(f"seed {job['run_seed']}{m}"))
    heads = {job["task"]: str(tmp)}
    t0 = time.time()
    meta["val_accuracy"] = _score(encoder, heads, "val", job["val_select"])[job["task"]]
    meta["val_accuracy_full"] = _score(encoder, heads, "val", None)[job["task"]]
    meta["test_accuracy"] = _score(encoder, heads, "test", None)[job["task"]]
    meta["score_seconds"] = round(time.time() - t0, 1)
    meta["cache_key"] = job["key"]
    _W["heads"].pop(str(tmp), None)
    finalize(tmp, out, meta)
    return meta


def _job_merge_eval(job: dict) -> list[dict]:
    """Merge through the engine, load the result (full checkpoint or adapter), score."""
    import drmerge

    from .run import _score
    from .training import load_trained

    out = Path(job["out"])
    stamp = out / "bench-config.json"
    merge_s = engine_s = 0.0
    warnings: list[str] = []
    reused = (out / "drmerge.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == job["spec"]
    if not reused:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        try:
            result = drmerge.merge(job["spec"], device="cpu")
        except drmerge.MergeError as e:
            if e.code != "invalid_spec":  # anything else is a real failure of the benchmark
                raise
            # A method that cannot take these inputs (e.g. no low-rank path for LoRA adapters).
            return [{"key": job["key"], "refused": f"{e.code}: {e.message}"}]
        merge_s, engine_s, warnings = time.time() - t0, result.seconds, list(result.warnings)
        stamp.write_text(json.dumps(job["spec"]))
    t1 = time.time()
    encoder = load_trained(out)
    results = [{"key": job["key"], "split": split, "accuracy": _score(encoder, job["heads"], split, limit),
                "merge_seconds": round(merge_s, 2), "engine_seconds": round(engine_s, 2), "reused_merge": reused,
                "warnings": warnings} for split, limit in job["splits"]]
    for r in results:
        r["eval_seconds"] = round((time.time() - t1) / len(results), 2)
    if not job.get("keep"):
        shutil.rmtree(out, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- the run

@dataclass
class HeadlineRun:
    regime: Regime
    work: Path
    out: Path
    seeds: list[int]
    data_seed: int = 0
    jobs: int = 2
    threads: int = 1
    keep_merged: bool = False
    rows: dict = field(default_factory=lambda: dict(G.ROWS))
    fixed: dict | None = None     # row -> params chosen on the tuning seed
    pool: ProcessPoolExecutor | None = None
    timings: dict = field(default_factory=dict)
    engine_calls: dict = field(default_factory=dict)  # seed -> [{key, merge_seconds, eval_seconds}] this invocation
    refused: dict = field(default_factory=dict)       # config key -> the engine's reason (invalid_spec at merge time)

    # -- setup: tasks (cached: building the nine candidate pools takes about a minute), tokens, base
    def prepare(self):
        import torch
        from transformers import AutoTokenizer

        from . import tasks as T
        from .data import Task
        from .finetune import encode, load_encoder, pretrained_dir, save_encoder

        t0 = time.time()
        r = self.regime
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        sources = T.source_versions()
        code = {n: hashlib.sha256((HERE / n).read_bytes()).hexdigest() for n in ("tasks.py", "data.py")}
        tkey = _sha({"tasks": r.tasks, "sizes": asdict(r.sizes), "seed": self.data_seed, "sources": sources,
                     "code": code})[:16]
        tpath = self.work / f"tasks-{tkey}.json"
        if tpath.is_file():
            raw = json.loads(tpath.read_text())
            self.tasks = {n: Task(n, tuple(d["labels"]), d["description"],
                                  *[[tuple(x) for x in d[s]] for s in ("train", "val", "test")])
                          for n, d in raw.items()}
            log(f"tasks {', '.join(r.tasks)} from cache ({tpath.name})")
        else:
            log(f"building tasks {', '.join(r.tasks)} (data seed {self.data_seed})")
            self.tasks = T.build_tasks(r.tasks, r.sizes, self.data_seed)
            tmp = tpath.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({n: {"labels": t.labels, "description": t.description, "train": t.train,
                                           "val": t.val, "test": t.test} for n, t in self.tasks.items()}))
            os.replace(tmp, tpath)
        self.manifest = T.manifest(self.tasks, self.data_seed)
        (self.out / f"{r.name}_splits.json").write_text(json.dumps(self.manifest, indent=2) + "\n")
        tok = AutoTokenizer.from_pretrained(str(pretrained_dir()))
        encoded = {n: {s: encode(tok, t.split(s), r.train.max_len) for s in ("train", "val", "test")}
                   for n, t in self.tasks.items()}
        self.encoded = encoded
        self.encoded_path = self.work / f"encoded-{tkey}-{r.train.max_len}.pt"
        if not self.encoded_path.is_file():
            tmp = self.encoded_path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(encoded, tmp)
            os.replace(tmp, self.encoded_path)
        self.base = self.work / "base"
        if not (self.base / "model.safetensors").is_file():
            tmp = self.work / f"base.{os.getpid()}.tmp"
            save_encoder(load_encoder(pretrained_dir()), tmp)
            os.replace(tmp, self.base)
        from .run import _worker_init

        self.pool = ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                        initargs=(str(self.encoded_path), self.threads))
        self.timings["prepare_seconds"] = round(time.time() - t0, 1)

    def _map(self, fn, jobs):
        futures = [self.pool.submit(fn, j) for j in jobs]
        for f in as_completed(futures):
            yield f.result()

    # -- fine-tunes
    def finetune_jobs(self, seed: int) -> tuple[dict, list[dict]]:
        from .training import cache_key, cached_meta, task_seed

        cfg = asdict(self.regime.train)
        metas, jobs = {}, []
        for name, task in self.tasks.items():
            sha = self.manifest["tasks"][name]["sha256"]
            tseed = task_seed(seed, name)
            key = cache_key(name, sha, task.labels, self.regime.train, tseed)
            out = self.work / "ft" / name / key[:16]
            meta = cached_meta(out, key)
            if meta is not None:
                metas[name] = dict(meta, cached=True, dir=str(out))
                continue
            jobs.append({"task": name, "labels": list(task.labels), "out": str(out), "seed": tseed, "run_seed": seed,
                         "config": cfg, "val_select": self.regime.val_select, "key": key})
        return metas, jobs

    def finetune(self, seeds: list[int]) -> dict[int, dict]:
        """Fine-tune every (seed, task) not in the cache, longest (in tokens) first."""
        t0 = time.time()
        metas, jobs = {}, []
        for s in seeds:
            metas[s], j = self.finetune_jobs(s)
            jobs += j
        if jobs:
            jobs.sort(key=lambda j: -sum(len(x) for x in self.encoded[j["task"]]["train"].ids))
            log(f"fine-tuning {len(jobs)} model(s) ({self.regime.train.kind}) on {self.jobs} worker(s)")
        by_key = {j["key"]: j for j in jobs}  # a key names one (task, seed): the seed is in it
        for meta in self._map(_job_train, jobs):
            job = by_key[meta["cache_key"]]
            seed = job["run_seed"]
            metas[seed][meta["task"]] = dict(meta, cached=False, dir=job["out"])
            log(f"seed {seed}: {meta['task']} trained in {meta['train_seconds']}s "
                f"({meta['train_cpu_seconds']} CPU-s), val {meta['val_accuracy']:.3f} test {meta['test_accuracy']:.3f}")
        self.timings["finetune_seconds"] = round(time.time() - t0, 1)
        self.timings["finetunes_trained"] = len(jobs)
        return {s: {n: metas[s][n] for n in self.tasks} for s in seeds}

    # -- references
    def base_features(self):
        import torch

        from .run import _job_base_features

        cache = self.work / f"{self.encoded_path.stem}-base-features.pt"
        if cache.is_file():
            return torch.load(cache, weights_only=False)
        feats = {r["task"]: r["features"] for r in
                 self._map(_job_base_features, [{"task": t, "base": str(self.base)} for t in self.tasks])}
        torch.save(feats, cache)
        return feats

    def references(self, seed: int, metas: dict) -> dict:
        """The linear probe of the pretrained encoder, and the pretrained encoder under the
        fine-tuned heads (the merge at lambda = 0)."""
        import torch

        from .finetune import accuracy, linear_probe, load_head

        feats = self.base_features()
        vs = self.regime.val_select
        out = {"probe": {"val": {}, "test": {}, "weight_decay": {}}, "pretrained_ft_heads": {"val": {}, "test": {}}}
        for name in self.tasks:
            f, enc = feats[name], self.encoded[name]
            lin, info = linear_probe(f["train"], enc["train"].labels, f["val"], enc["val"].labels,
                                     len(self.tasks[name].labels), seed)
            head = load_head(Path(metas[name]["dir"]))
            with torch.inference_mode():
                out["probe"]["val"][name] = accuracy(lin(f["val"][:vs]), enc["val"].labels[:vs])
                out["probe"]["test"][name] = accuracy(lin(f["test"]), enc["test"].labels)
                out["probe"]["weight_decay"][name] = info["weight_decay"]
                out["pretrained_ft_heads"]["val"][name] = accuracy(head(f["val"][:vs]), enc["val"].labels[:vs])
                out["pretrained_ft_heads"]["test"][name] = accuracy(head(f["test"]), enc["test"].labels)
        return out

    def deltas(self, seed: int, metas: dict) -> dict:
        from .deltas import delta_stats

        key = _sha(sorted(m["cache_key"] for m in metas.values()))[:16]
        path = self.work / f"seed{seed}" / f"deltas-{key}.json"
        if path.is_file():
            return json.loads(path.read_text())
        t0 = time.time()
        stats = delta_stats(self.base, {t: Path(m["dir"]) for t, m in metas.items()})
        stats["seconds"] = round(time.time() - t0, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats, indent=2))
        return stats

    # -- merges
    def spec(self, method: str, params: dict, metas: dict, out: Path) -> dict:
        spec = {"models": [{"model": metas[t]["dir"]} for t in self.tasks], "method": method,
                "output": str(out), "dtype": "float32", "overwrite": True}
        if method != "linear" or self.regime.output_format != "full":
            spec["base_model"] = str(self.base)
        if self.regime.output_format != "full":
            spec["output_format"] = self.regime.output_format
        if params:
            spec["parameters"] = dict(params)
        if self.regime.select_ignore:
            spec["select"] = {"ignore": list(self.regime.select_ignore)}
        return spec

    def accepted(self, method: str, params: dict, metas: dict) -> str | None:
        """None if the engine accepts this row's spec, else its reason (a method not yet in it)."""
        import drmerge

        try:
            drmerge.parse_spec(self.spec(method, params, metas, self.work / "probe-spec"))
        except drmerge.MergeError as e:
            return str(e)
        return None

    def evaluate(self, seed: int, configs: list[tuple[str, dict]], splits: tuple[str, ...], metas: dict,
                 cache: dict, models_key: str) -> dict:
        jobs = []
        for method, params in configs:
            key = method + ":" + json.dumps(params, sort_keys=True)
            todo = [s for s in splits if (key, s) not in cache]
            if not todo or any(j["key"] == key for j in jobs):
                continue
            out = self.work / f"seed{seed}" / "merged" / hashlib.sha1(key.encode()).hexdigest()[:12]
            jobs.append({"key": key, "heads": {t: metas[t]["dir"] for t in self.tasks}, "out": str(out), "keep": True,
                         "splits": [(s, self.regime.val_select if s == "val" else None) for s in todo],
                         "spec": self.spec(method, params, metas, out)})
        if jobs:
            log(f"seed {seed}: {len(jobs)} merge(s) to score on {'+'.join(splits)}")
        path = self.work / f"seed{seed}" / f"evals-{models_key}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        for done, results in enumerate(self._map(_job_merge_eval, jobs), 1):
            if "refused" in results[0]:  # not cached: a later engine may accept it
                self.refused[results[0]["key"]] = results[0]["refused"]
                log(f"seed {seed}: the engine refused {results[0]['key']}: {results[0]['refused']}")
                continue
            if not results[0]["reused_merge"]:
                self.engine_calls.setdefault(seed, []).append(
                    {k: results[0][k] for k in ("key", "merge_seconds", "engine_seconds", "eval_seconds")})
            for r in results:
                cache[(r["key"], r["split"])] = r
                with open(path, "a") as f:
                    f.write(json.dumps(r) + "\n")
            if done % 8 == 0 or done == len(jobs):
                r = results[0]
                log(f"seed {seed}: {done}/{len(jobs)} scored (last {r['key']}: merge {r['merge_seconds']}s, "
                    f"eval {r['eval_seconds']}s)")
        keys = [m + ":" + json.dumps(p, sort_keys=True) for m, p in configs]
        return {s: {k: cache[(k, s)] for k in keys if (k, s) in cache} for s in splits}

    def run_seed(self, seed: int, metas: dict) -> dict:
        t0 = time.time()
        tasks = list(self.tasks)
        ft_val = {t: metas[t]["val_accuracy"] for t in tasks}
        ft_test = {t: metas[t]["test_accuracy"] for t in tasks}
        refs = self.references(seed, metas)
        stats = self.deltas(seed, metas)
        models_key = _sha(sorted(m["cache_key"] for m in metas.values()) + [asdict(self.regime)])[:16]
        path = self.work / f"seed{seed}" / f"evals-{models_key}.jsonl"
        cache = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                cache[(r["key"], r["split"])] = r

        def norm(accs, ref):
            return sum(accs[t] / ref[t] if ref[t] > 0 else 0.0 for t in tasks) / len(tasks)

        table = G.grids(self.rows, smoke=self.regime.smoke)
        skipped = {}
        for name in list(table):
            why = self.accepted(self.rows[name].method, table[name][0], metas)
            if why:
                skipped[name] = why
                del table[name]
        if self.fixed:
            table = {n: [self.fixed[n]] for n in table if n in self.fixed}
        configs = [(self.rows[n].method, p) for n, grid in table.items() for p in grid]
        single = [(self.rows[n].method, g[0]) for n, g in table.items() if len(g) == 1]
        t_val = time.time()
        self.evaluate(seed, single, ("val", "test"), metas, cache, models_key)
        val = self.evaluate(seed, configs, ("val",), metas, cache, models_key)["val"]
        val_seconds = time.time() - t_val
        for name in list(table):  # a row any of whose points the engine refused is left out whole
            why = [self.refused[k] for k in (self.rows[name].method + ":" + json.dumps(p, sort_keys=True)
                                             for p in table[name]) if k in self.refused]
            if why:
                skipped[name] = why[0]
                del table[name]
        chosen, grid_scores = {}, {}
        for name, grid in table.items():
            method = self.rows[name].method
            scored = [(norm(val[method + ":" + json.dumps(p, sort_keys=True)]["accuracy"], ft_val), i, p)
                      for i, p in enumerate(grid)]
            best = max(scored, key=lambda x: (x[0], -x[1]))
            chosen[name] = best[2]
            grid_scores[name] = [{"params": p, "val_normalized": round(s, 4)} for s, _, p in scored]
        t_test = time.time()
        test = self.evaluate(seed, [(self.rows[n].method, p) for n, p in chosen.items()], ("test",), metas, cache,
                             models_key)["test"]
        test_seconds = time.time() - t_test
        if not self.keep_merged:
            shutil.rmtree(self.work / f"seed{seed}" / "merged", ignore_errors=True)
        rows = {"finetuned": {"test": ft_test, "val": ft_val},
                "probe": {"test": refs["probe"]["test"], "val": refs["probe"]["val"]},
                "pretrained_ft_heads": refs["pretrained_ft_heads"]}
        for name, p in chosen.items():
            k = self.rows[name].method + ":" + json.dumps(p, sort_keys=True)
            rows[name] = {"test": test[k]["accuracy"], "val": val[k]["accuracy"], "params": p,
                          "merges": len(table[name]), "merge_seconds": test[k]["merge_seconds"]}
        for r in rows.values():
            r["test_avg"] = sum(r["test"].values()) / len(tasks)
            r["test_normalized"] = norm(r["test"], ft_test)
            r["test_normalized_per_task"] = {t: r["test"][t] / ft_test[t] if ft_test[t] else 0.0 for t in tasks}
        calls = self.engine_calls.get(seed, [])
        return {"seed": seed, "tuned": not self.fixed, "rows": rows, "grids": grid_scores, "skipped_rows": skipped,
                "deltas": stats, "probe_weight_decay": refs["probe"]["weight_decay"],
                "finetune": {t: {k: metas[t].get(k) for k in ("train_seconds", "train_cpu_seconds", "padded_tokens",
                                                               "final_loss", "seed", "cached", "cache_key",
                                                               "val_accuracy_full", "trainable_parameters")}
                             for t in tasks},
                "merge_seconds": sorted(c["merge_seconds"] for c in calls), "engine_calls": calls,
                "seconds": {"total": round(time.time() - t0, 1), "val_grid": round(val_seconds, 1),
                            "test": round(test_seconds, 1)}}

    def close(self):
        if self.pool:
            self.pool.shutdown()


# ----------------------------------------------------------------------------- report

def _stats(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def aggregate(seeds: list[dict], tasks: list[str]) -> dict:
    rows = {}
    for name in seeds[0]["rows"]:
        if not all(name in s["rows"] for s in seeds):
            continue
        rows[name] = {"per_task": {t: _stats([s["rows"][name]["test"][t] for s in seeds]) for t in tasks},
                      "avg_accuracy": _stats([s["rows"][name]["test_avg"] for s in seeds]),
                      "avg_normalized": _stats([s["rows"][name]["test_normalized"] for s in seeds])}
    return rows


def markdown(results: dict) -> str:
    meta, tasks, agg, seeds = results["meta"], results["tasks"], results["aggregate"], results["seeds"]
    labels = {"finetuned": "Fine-tuned (one model per task)", "probe": "Pretrained + linear probe",
              "pretrained_ft_heads": "Pretrained encoder + fine-tuned heads (λ = 0)",
              **{n: r.label for n, r in G.ROWS.items()}}
    f = lambda st: f"{100 * st['mean']:.1f}" + (f" ± {100 * st['std']:.1f}" if len(st["values"]) > 1 else "")  # noqa: E731
    L = [f"Command: `{meta['command']}`  ", f"Seeds: {', '.join(map(str, meta['seeds']))} (grids on seed "
         f"{meta['tune_seed']}); wall {meta['wall_seconds'] / 60:.1f} min; load average {meta['load_start']} -> "
         f"{meta['load_end']}", "",
         "| Method | " + " | ".join(tasks) + " | Avg acc | Avg normalized | Merges |",
         "|" + "---|" * (len(tasks) + 4)]
    for name, a in agg.items():
        merges = seeds[0]["rows"][name].get("merges", "")
        L.append(f"| {labels.get(name, name)} | " + " | ".join(f(a["per_task"][t]) for t in tasks)
                 + f" | {f(a['avg_accuracy'])} | {f(a['avg_normalized'])} | {merges} |")
    ft, pr = agg["finetuned"]["per_task"], agg["probe"]["per_task"]
    gap = [100 * (ft[t]["mean"] - pr[t]["mean"]) for t in tasks]
    L += ["", "Fine-tune minus probe (test, points): " + ", ".join(f"{t} {g:+.1f}" for t, g in zip(tasks, gap))
          + f"; mean {statistics.fmean(gap):+.1f}", ""]
    d = seeds[0]["deltas"]
    L += [f"Task vectors (seed {seeds[0]['seed']}, {d['matrices']} encoder matrices): relative norm "
          + ", ".join(f"{t} {100 * d['relative_norm'][t]:.2f}%" for t in tasks)
          + f"; pairwise cosines {d['cosine_offdiag']['min']:.3f} to {d['cosine_offdiag']['max']:.3f} "
          f"(mean {d['cosine_offdiag']['mean']:.3f})", ""]
    L += ["| cosine | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for a in tasks:
        L.append(f"| {a} | " + " | ".join(f"{d['cosine'][a][b]:.3f}" for b in tasks) + " |")
    L += ["", "Chosen on validation: " + "; ".join(f"{labels[n]} {seeds[0]['rows'][n]['params']}"
                                                   for n in agg if "params" in seeds[0]["rows"][n]), ""]
    for s in seeds:
        if s["skipped_rows"]:
            L.append(f"Rows the engine did not accept (seed {s['seed']}): " + "; ".join(
                f"{n}: {why}" for n, why in s["skipped_rows"].items()))
    return "\n".join(L) + "\n"


def main(args, argv_text: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    reg = regime(args.regime, args.smoke)
    if args.tasks:
        from .tasks import TASKS

        unknown = [t for t in args.tasks if t not in TASKS]
        if unknown:
            raise SystemExit(f"unknown --tasks {unknown}; known: {', '.join(TASKS)}")
        reg = replace(reg, tasks=tuple(args.tasks))
    seeds = args.seeds or ([0] if args.smoke else [0, 1, 2])
    work = args.work or HERE / (f"_work_{args.regime}" + ("_smoke" if args.smoke else ""))
    out = args.out or work / "out"
    tune = seeds[0] if args.tune_seed is None else args.tune_seed
    if tune not in seeds:
        raise SystemExit("--tune-seed must be one of --seeds")
    rows = dict(G.ROWS)
    if args.rows:
        unknown = [r for r in args.rows if r not in rows]
        if unknown:
            raise SystemExit(f"unknown --rows {unknown}; known: {', '.join(rows)}")
        rows = {r: rows[r] for r in args.rows}
    run = HeadlineRun(reg, work, out, seeds, args.data_seed, args.jobs, args.threads, args.keep_merged, rows)
    started, load_start = time.time(), round(os.getloadavg()[0], 2)
    results_seeds = []
    try:
        run.prepare()
        metas = run.finetune(seeds)
        if not args.finetune_only:
            for s in [tune] + [s for s in seeds if s != tune]:
                results_seeds.append(run.run_seed(s, metas[s]))
                log(f"seed {s}: done in {results_seeds[-1]['seconds']['total']}s")
                if s == tune:
                    run.fixed = {n: r["params"] for n, r in results_seeds[0]["rows"].items() if "params" in r}
    finally:
        run.close()
    results_seeds.sort(key=lambda r: r["seed"])
    tasks = list(run.tasks)
    import resource

    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    meta = {"command": argv_text, "regime": asdict(reg), "seeds": seeds, "tune_seed": tune,
            "data_seed": args.data_seed, "jobs": args.jobs, "threads": args.threads,
            "wall_seconds": round(time.time() - started, 1), "cpu_seconds_this_invocation": round(cpu, 1),
            "load_start": load_start,
            "load_end": round(os.getloadavg()[0], 2), "timings": run.timings, "splits": run.manifest,
            "finetunes": {s: {t: {k: m.get(k) for k in ("val_accuracy", "test_accuracy", "train_seconds",
                                                          "train_cpu_seconds", "cached", "dir")}
                              for t, m in metas[s].items()} for s in seeds}}
    results = {"meta": meta, "tasks": tasks, "seeds": results_seeds,
               "aggregate": aggregate(results_seeds, tasks) if results_seeds else {}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.regime}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    if results_seeds:
        (out / f"{args.regime}.md").write_text(markdown(results))
    log(f"wrote {out / (args.regime + '.json')} ({meta['wall_seconds'] / 60:.1f} min)")
    return results

