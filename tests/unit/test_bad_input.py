"""Every bad input gets a stable code, a message that says what to fix, and writes nothing."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from drmerge.errors import Cancelled, MergeError
from drmerge.pipeline import run_merge, validate
from drmerge.spec import load_spec_file, parse_spec

from tests.support.factories import load_tensors, make_family, write_raw_safetensors


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    base, models = make_family(str(root), n_models=2)
    return base, models


def merge_error(spec: dict) -> MergeError:
    out = spec.get("output")
    with pytest.raises(MergeError) as err:
        run_merge(parse_spec(spec), device="cpu")
    if out and not out.startswith("s3://"):
        assert not os.path.exists(os.path.join(out, "drmerge.json"))
        assert not os.path.exists(out) or not [f for f in os.listdir(out) if f.endswith(".safetensors")]
    return err.value


@pytest.mark.parametrize("spec,param", [
    ({"models": ["a"], "output": "o", "base_model": "b", "colour": 1}, "colour"),
    ({"models": ["a"], "output": "o", "base_model": "b", "parameters": {"drop_rate": 1.5}}, "parameters.drop_rate"),
    ({"models": ["a"], "output": "o", "base_model": "b", "parameters": {"dropout": 0.1}}, "parameters.dropout"),
    ({"models": ["a"], "output": "o", "base_model": "b", "parameters": {"direction": "diagonal"}}, "parameters.direction"),
    ({"models": ["a"], "output": "o", "base_model": "b", "parameters": {"scale": float("nan")}}, "parameters.scale"),
    ({"models": ["a"], "output": "o", "base_model": "b", "method": "slerp"}, "method"),
    ({"models": [], "output": "o", "base_model": "b"}, "models"),
    ({"models": [{"model": "a", "wieght": 2}], "output": "o", "base_model": "b"}, "models[0].wieght"),
    ({"models": [{"model": "a", "weight": "heavy"}], "output": "o", "base_model": "b"}, "models[0].weight"),
    ({"models": ["a"], "output": "o"}, "base_model"),
    ({"models": ["a"], "base_model": "b"}, "output"),
    ({"models": ["a"], "output": "o", "base_model": "b", "select": {"linear": ["(unclosed"]}}, "select.linear[0]"),
    ({"models": ["a"], "output": "o", "base_model": "b", "dtype": "int8"}, "dtype"),
    ({"models": ["a"], "output": "o", "base_model": "b", "shard_size": "lots"}, "shard_size"),
    ({"models": ["a"], "output": "b", "base_model": "b"}, "output"),
    ({"models": ["gs://bucket/x"], "output": "o", "base_model": "b"}, "models[0].model"),
    ({"models": ["s3://Bad_Bucket/x"], "output": "o", "base_model": "b"}, "models[0].model"),
])
def test_invalid_spec_names_the_field(spec, param):
    with pytest.raises(MergeError) as err:
        parse_spec(spec)
    assert err.value.code == "invalid_spec"
    assert err.value.param == param
    assert param.split("[")[0].split(".")[0] in err.value.message


def test_spec_file_that_is_not_a_mapping(tmp_path):
    p = tmp_path / "spec.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(MergeError) as err:
        load_spec_file(str(p))
    assert err.value.code == "invalid_spec"
    p.write_text("base_model: [unclosed\n")
    with pytest.raises(MergeError) as err:
        load_spec_file(str(p))
    assert err.value.code == "invalid_spec"


def test_missing_checkpoint_dir(family, tmp_path):
    base, models = family
    e = merge_error({"base_model": base, "models": [models[0], str(tmp_path / "nope")], "output": str(tmp_path / "o")})
    assert e.code == "input_not_found" and "nope" in e.message


def test_dir_without_safetensors(family, tmp_path):
    base, models = family
    d = tmp_path / "pt"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\0" * 16)
    e = merge_error({"base_model": base, "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "input_not_found" and "safetensors" in e.message


def copy_with(src: str, dst: str, mutate) -> str:
    from tests.support.factories import load_tensors

    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = load_tensors(src)
    mutate(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return dst


def test_missing_tensor_is_incompatible(family, tmp_path):
    base, models = family
    bad = copy_with(models[0], str(tmp_path / "m"), lambda t: [t.pop(k) for k in sorted(t)[:7]])
    e = merge_error({"base_model": base, "models": [bad], "output": str(tmp_path / "o")})
    assert e.code == "incompatible_checkpoints" and "lacks 7 tensor(s)" in e.message and "and 2 more" in e.message


def test_integer_buffer_only_in_the_reference_is_copied_with_a_warning(family, tmp_path):
    """A base saved by an older transformers holds BERT's int64 ``embeddings.position_ids``
    buffer that newer fine-tunes lack: it is copied from the base, not refused."""
    base, models = family
    buffer = torch.arange(64, dtype=torch.int64).unsqueeze(0)
    with_buffer = copy_with(base, str(tmp_path / "base"), lambda t: t.__setitem__("embeddings.position_ids", buffer))
    result = run_merge(parse_spec({"base_model": with_buffer, "models": models, "output": str(tmp_path / "o")}),
                       device="cpu")
    assert any("lacks 1 tensor(s) that are copied from the base" in w and "embeddings.position_ids" in w
               for w in result.warnings), result.warnings
    merged = load_tensors(str(tmp_path / "o"))
    assert torch.equal(merged["embeddings.position_ids"], buffer)
    # linear has no base: the first model is the reference the buffer is copied from
    first = copy_with(models[0], str(tmp_path / "ft0"), lambda t: t.__setitem__("embeddings.position_ids", buffer))
    run_merge(parse_spec({"method": "linear", "models": [first, models[1]], "output": str(tmp_path / "lin")}),
              device="cpu")
    assert torch.equal(load_tensors(str(tmp_path / "lin"))["embeddings.position_ids"], buffer)


def test_shape_mismatch_is_incompatible(family, tmp_path):
    base, models = family
    name = "encoder.layer.0.output.dense.weight"
    bad = copy_with(models[0], str(tmp_path / "m"), lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    e = merge_error({"base_model": base, "models": [models[1], bad], "output": str(tmp_path / "o")})
    assert e.code == "incompatible_checkpoints" and name in e.message and "[3, 3]" in e.message


@pytest.mark.parametrize("method", ["drm", "ties", "task_arithmetic"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights(family, tmp_path, value, method):
    base, models = family
    name = "encoder.layer.1.intermediate.dense.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][0, 0] = value

    bad = copy_with(models[1], str(tmp_path / "m"), poison)
    e = merge_error({"base_model": base, "models": [models[0], bad], "output": str(tmp_path / "o"),
                     "shard_size": "10KB", "method": method})
    assert e.code == "non_finite_weights" and name in e.message and "models[1]" in e.message


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_non_finite_base_is_named(family, tmp_path, method):
    base, models = family
    name = "encoder.layer.0.attention.self.query.bias"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3] = float("inf")

    bad = copy_with(base, str(tmp_path / "b"), poison)
    e = merge_error({"base_model": bad, "models": models, "output": str(tmp_path / "o"), "method": method})
    assert e.code == "non_finite_weights" and name in e.message and "base_model" in e.message


def test_extra_tensors_are_reported_not_merged(family, tmp_path):
    base, models = family
    extra = copy_with(models[0], str(tmp_path / "m"), lambda t: t.__setitem__("classifier.weight", torch.ones(2, 32)))
    result = run_merge(parse_spec({"base_model": base, "models": [extra], "output": str(tmp_path / "o")}), device="cpu")
    assert any("classifier.weight" in w for w in result.warnings)


def corrupt_variants(ok_data_len=16):
    good = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    return {
        "header_len_2_63": dict(header=good, data=b"\0" * 16, header_len=2**63),
        "header_len_past_end": dict(header=good, data=b"\0" * 16, header_len=10_000),
        "header_not_json": dict(header=b"{not json!", data=b""),
        "header_not_object": dict(header=b"[1, 2]", data=b""),
        "unknown_dtype": dict(header={"w": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, data=b"\0" * 32),
        "offsets_past_end": dict(header={"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, data=b"\0" * 8),
        "size_mismatch": dict(header={"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, data=b"\0" * 16),
        "overlapping": dict(header={"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                    "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, data=b"\0" * 24),
        "shape_overflow": dict(header={"w": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 16]}},
                               data=b"\0" * 16),
        "negative_shape": dict(header={"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, data=b"\0" * 16),
        "truncated": dict(header=b"", data=b"", header_len=None),
    }


@pytest.mark.parametrize("case", sorted(corrupt_variants()))
def test_corrupt_safetensors(tmp_path, case):
    d = tmp_path / "m"
    d.mkdir()
    if case == "truncated":
        (d / "model.safetensors").write_bytes(b"\x10\0\0")
    else:
        write_raw_safetensors(str(d / "model.safetensors"), **corrupt_variants()[case])
    e = merge_error({"base_model": str(d), "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint", e
    assert "model.safetensors" in e.message


def test_truncated_real_shard(family, tmp_path):
    base, models = family
    d = tmp_path / "m"
    shutil.copytree(models[0], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    e = merge_error({"base_model": base, "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint"


@pytest.mark.parametrize("target", ["../escape.safetensors", "/etc/passwd.safetensors", "missing.safetensors", "notes.txt"])
def test_index_pointing_outside_or_to_missing_shards(family, tmp_path, target):
    base, models = family
    d = tmp_path / "m"
    shutil.copytree(models[0], d)
    os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"encoder.layer.0.output.dense.weight": target}}))
    e = merge_error({"base_model": base, "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint" and target.split("/")[-1] in e.message


def test_validate_catches_the_same_errors_without_writing(family, tmp_path):
    base, models = family
    with pytest.raises(MergeError) as err:
        validate(parse_spec({"base_model": base, "models": [str(tmp_path / "nope")], "output": str(tmp_path / "o")}))
    assert err.value.code == "input_not_found"
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- size bounds (issue 18, item 4)

def sharded_copy(src: str, d) -> None:
    shutil.copytree(src, d)
    os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")


def test_an_oversized_index_is_refused_unread(family, tmp_path):
    from drmerge.checkpoint import MAX_INDEX_BYTES

    base, models = family
    d = tmp_path / "m"
    sharded_copy(models[0], d)
    with open(d / "model.safetensors.index.json", "wb") as f:
        f.truncate(MAX_INDEX_BYTES + 1)  # sparse: refused by its size before a byte is read
    e = merge_error({"base_model": base, "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint" and "model.safetensors.index.json" in e.message
    assert str(MAX_INDEX_BYTES) in e.message


def test_an_index_listing_too_many_tensors_is_refused(family, tmp_path):
    from drmerge.checkpoint import MAX_TENSORS

    base, models = family
    d = tmp_path / "m"
    sharded_copy(models[0], d)
    weight_map = {f"t{i}": "model-00001-of-00001.safetensors" for i in range(MAX_TENSORS + 1)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    e = merge_error({"base_model": base, "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint" and f"lists {MAX_TENSORS + 1} tensors" in e.message


def test_a_header_listing_too_many_tensors_is_refused(tmp_path, monkeypatch):
    import drmerge.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "MAX_TENSORS", 3)  # the real bound is 2^18 entries (~20 MB of header)
    d = tmp_path / "m"
    d.mkdir()
    header = {f"w{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(4)}
    write_raw_safetensors(str(d / "model.safetensors"), header, b"\0" * 16)
    e = merge_error({"base_model": str(d), "models": [str(d)], "output": str(tmp_path / "o")})
    assert e.code == "corrupt_checkpoint" and "4 tensors" in e.message and "(3)" in e.message


def test_select_patterns_that_together_unroll_too_far_are_refused():
    from drmerge.patterns import MAX_TOTAL_PATTERN_SIZE

    each = MAX_TOTAL_PATTERN_SIZE // 4  # each alone is fine
    with pytest.raises(MergeError) as err:
        parse_spec({"base_model": "b", "models": ["a"], "output": "o",
                    "select": {"linear": [f"a{{{each}}}", ".*weight"], "exclude": [f"b{{{each}}}", f"d{{{each}}}"],
                               "ignore": [f"c{{{each}}}"]}})
    assert err.value.code == "invalid_spec" and err.value.param == "select.ignore[0]"
    assert f"more than {MAX_TOTAL_PATTERN_SIZE} elements" in err.value.message


# ---------------------------------------------------------------- cancel while planning (issue 18, item 4)

def test_a_cancel_takes_effect_while_planning(family, tmp_path):
    """The cancel hook (the service's also carries the time limit) is asked while the
    plan is made, not only between tensors: a run cancelled during planning stops there."""
    base, models = family
    calls, stages = [], []

    def cancel() -> bool:
        calls.append(stages[-1] if stages else None)
        return True

    with pytest.raises(Cancelled):
        run_merge(parse_spec({"base_model": base, "models": models, "output": str(tmp_path / "o")}), device="cpu",
                  should_cancel=cancel, progress=lambda p: stages.append(p.stage))
    assert calls == ["planning"] and stages == ["planning"]
    assert not (tmp_path / "o").exists()
