"""Resume at engine level: a run that stops keeps its committed shards, a later run given
them verifies each one (size + sha256, read back) and merges only the rest, and the result
equals an uninterrupted merge byte for byte. Local disk (a real S3 server:
tests/integration/test_resume.py)."""

from __future__ import annotations

import json
import os

import pytest

import drmerge.execute as execute
from drmerge.errors import Cancelled, Interrupted, MergeError
from drmerge.pipeline import discard_partial_output, run_merge
from drmerge.spec import parse_spec
from tests.support.factories import make_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(str(tmp_path_factory.mktemp("resume")), n_models=2)


def spec_for(family, out, **kw) -> dict:
    base, models = family
    return dict({"base_model": base, "models": models, "output": str(out), "shard_size": "20KB"}, **kw)


def files_of(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def weights_of(folder) -> dict[str, bytes]:
    return {n: b for n, b in files_of(folder).items() if n != "drmerge.json"}


class CountMerges:
    """Counts tensors actually merged (execute.merge_one calls)."""

    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = execute.merge_one

        def counting(inputs, tp, *a, **kw):
            self.names.append(tp.name)
            return real(inputs, tp, *a, **kw)

        monkeypatch.setattr(execute, "merge_one", counting)


def interrupted_run(spec: dict, after_tensors: int) -> tuple[list[dict], Interrupted]:
    """Run until ``after_tensors`` tensors were merged, then pause; returns the journal."""
    journal: list[dict] = []
    polls = {"n": 0}

    def pause() -> bool:
        polls["n"] += 1
        return polls["n"] > after_tensors

    with pytest.raises(Interrupted) as err:
        run_merge(parse_spec(spec), device="cpu", on_shard=journal.append, should_pause=pause)
    return journal, err.value


@pytest.fixture(scope="module")
def clean(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    result = run_merge(parse_spec(spec_for(family, out)), device="cpu")
    assert len([f for f in result.files if f["name"].endswith(".safetensors")]) >= 4
    return out, result


def test_a_resumed_merge_skips_kept_shards_and_equals_a_clean_run(family, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, stop = interrupted_run(spec, after_tensors=30)
    assert 1 <= len(journal) and stop.kept == len(journal)
    # what the stopped run left: exactly its committed shards, nothing half-written
    assert sorted(os.listdir(out)) == sorted(e["name"] for e in journal)
    for e in journal:
        assert set(e) == {"name", "size", "sha256", "plan"} and os.path.getsize(out / e["name"]) == e["size"]
    counter = CountMerges(monkeypatch)
    result = run_merge(parse_spec(spec), device="cpu", completed_shards=journal)
    total = clean[1].tensors
    assert result.resumed == {"shards_kept": len(journal), "tensors_skipped": total - len(counter.names)}
    assert 0 < len(counter.names) < total
    kept_tensors = {n for e in journal for n in _tensors_in(out, e["name"])}
    assert not kept_tensors & set(counter.names)  # only tensors of unfinished shards were merged
    assert weights_of(out) == weights_of(clean[0])
    assert result.files == clean[1].files
    marker = json.loads((out / "drmerge.json").read_text())
    assert marker["files"] == clean[1].files


def _tensors_in(folder, name) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / name), "pt") as f:
        return list(f.keys())


def test_a_kept_shard_that_does_not_verify_is_rewritten(family, clean, tmp_path):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, _ = interrupted_run(spec, after_tensors=30)
    assert len(journal) >= 2
    damaged = out / journal[0]["name"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(data))
    (out / journal[1]["name"]).unlink()  # gone altogether
    result = run_merge(parse_spec(spec), device="cpu", completed_shards=journal)
    assert result.resumed["shards_kept"] == len(journal) - 2
    assert any(journal[0]["name"] in w and "sha256" in w for w in result.warnings)
    assert any(journal[1]["name"] in w and "rewriting" in w for w in result.warnings)
    assert weights_of(out) == weights_of(clean[0])


def test_a_journal_from_other_settings_is_not_trusted(family, clean, tmp_path):
    out = tmp_path / "out"
    journal, _ = interrupted_run(spec_for(family, out, parameters={"drop_rate": 0.5}), after_tensors=30)
    result = run_merge(parse_spec(spec_for(family, out)), device="cpu", completed_shards=journal)
    assert result.resumed["shards_kept"] == 0
    assert any("other inputs or settings" in w for w in result.warnings)
    assert weights_of(out) == weights_of(clean[0])


def test_an_output_finished_by_an_earlier_run_is_recognised(family, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    first = run_merge(parse_spec(spec), device="cpu")
    counter = CountMerges(monkeypatch)
    again = run_merge(parse_spec(spec), device="cpu", completed_shards=[])  # died before reporting success
    assert counter.names == [] and again.files == first.files and again.resumed["shards_kept"] == len(first.files)
    with pytest.raises(MergeError) as err:  # a different merge into the same place is still refused
        run_merge(parse_spec(spec_for(family, out, method="ties")), device="cpu", completed_shards=[])
    assert err.value.code == "output_exists"


def test_a_failure_after_a_resume_removes_everything(family, tmp_path):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, _ = interrupted_run(spec, after_tensors=30)
    polls = {"n": 0}

    def cancel_soon() -> bool:
        polls["n"] += 1
        return polls["n"] > 5

    with pytest.raises(Cancelled):
        run_merge(parse_spec(spec), device="cpu", completed_shards=journal, should_cancel=cancel_soon)
    assert not out.exists()  # kept shards too: a failed job leaves no partial output


def test_a_failure_while_a_pause_is_requested_keeps_the_output(family, tmp_path, monkeypatch):
    """A worker that lost its job (re-queued to another) must not delete what the newer
    attempt now relies on, even if it then hits an error."""
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, _ = interrupted_run(spec, after_tensors=30)
    before = files_of(out)
    lost = {"flag": False}

    def boom(*a, **kw):
        lost["flag"] = True  # the heartbeat found the job taken over, and its upload was aborted
        raise MergeError("storage_error", "the upload was aborted under us")

    monkeypatch.setattr(execute, "merge_one", boom)
    with pytest.raises(Interrupted):
        run_merge(parse_spec(spec), device="cpu", completed_shards=journal, should_pause=lambda: lost["flag"])
    assert files_of(out) == before


def test_a_failed_run_that_no_longer_owns_its_output_deletes_nothing(family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, _ = interrupted_run(spec, after_tensors=30)
    before = files_of(out)
    calls = {"merged": 0}
    real = execute.merge_one

    def fail_later(*a, **kw):
        calls["merged"] += 1
        if calls["merged"] > 8:
            raise MergeError("storage_error", "S3 went away")
        return real(*a, **kw)

    monkeypatch.setattr(execute, "merge_one", fail_later)
    asked = []
    with pytest.raises(Interrupted):
        run_merge(parse_spec(spec), device="cpu", completed_shards=journal, on_shard=journal.append,
                  owns_output=lambda: asked.append(1) or False)
    assert asked == [1]
    after = files_of(out)
    assert {n: after[n] for n in before} == before  # kept shards are all still there
    # ...and with the output still ours, the same failure cleans up everything
    with pytest.raises(MergeError) as err:
        run_merge(parse_spec(spec), device="cpu", completed_shards=journal, owns_output=lambda: True)
    assert err.value.code == "storage_error" and not out.exists()


def test_discard_partial_output(family, clean, tmp_path):
    out = tmp_path / "out"
    spec = spec_for(family, out)
    journal, _ = interrupted_run(spec, after_tensors=30)
    (out / ".model-00009-of-00009.safetensors.abcd1234.partial").write_bytes(b"half")
    removed = discard_partial_output(parse_spec(spec), journal)
    assert sorted(removed) == sorted(e["name"] for e in journal) and not out.exists()
    # a finished merge is never touched
    assert discard_partial_output(parse_spec(spec_for(family, clean[0])), clean[1].files) == []
    assert (clean[0] / "drmerge.json").exists()
