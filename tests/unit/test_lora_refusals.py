"""Every adapter we cannot merge exactly is refused with a stable code, naming the adapter
and the module at fault, and nothing is written."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from drmerge import merge
from drmerge.errors import MergeError
from drmerge.spec import parse_spec
from tests.support.lora_helpers import edit_config, make_adapter, make_base, make_full_finetune

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_refuse")
    base = make_base(str(d / "base"))
    good = make_adapter(base, str(d / "good"), seed=1, r=4, target_modules=["q_proj", "v_proj"])
    return {"dir": d, "base": base, "good": good}


def variant(env, name: str, **lora_kwargs) -> str:
    return make_adapter(env["base"], str(env["dir"] / name), seed=2, r=4, **lora_kwargs)


def copy_good(env, tmp_path, name="bad") -> str:
    path = str(tmp_path / name)
    shutil.copytree(env["good"], path)
    return path


def refused(spec: dict, code: str, *needles: str, param: str | None = None) -> MergeError:
    with pytest.raises(MergeError) as e:
        merge(spec, device="cpu")
    assert e.value.code == code, e.value
    for n in needles:
        assert n in e.value.message, (n, e.value.message)
    if param is not None:
        assert e.value.param == param
    if "output" in spec:
        assert not os.path.exists(spec["output"]), "a refused merge must leave nothing behind"
    return e.value


def spec_for(env, tmp_path, bad: str, **extra) -> dict:
    return {"base_model": env["base"], "models": [env["good"], bad], "output": str(tmp_path / "out"), **extra}


def test_dora(env, tmp_path):
    bad = variant(env, "dora", target_modules=["q_proj"], use_dora=True)
    refused(spec_for(env, tmp_path, bad), "invalid_spec", "DoRA", bad, Q0, param="models[1].model")


def test_modules_to_save(env, tmp_path):
    bad = variant(env, "mts", target_modules=["q_proj"], modules_to_save=["lm_head"])
    refused(spec_for(env, tmp_path, bad), "invalid_spec", "modules_to_save", "lm_head", bad)


def test_embedding_lora(env, tmp_path):
    bad = variant(env, "emb", target_modules=["q_proj", "embed_tokens"])
    refused(spec_for(env, tmp_path, bad), "invalid_spec", "embedding LoRA", "model.embed_tokens", bad)


def test_lora_bias(env, tmp_path):
    bad = variant(env, "lbias", target_modules=["q_proj"], lora_bias=True)
    refused(spec_for(env, tmp_path, bad), "invalid_spec", "bias", Q0, bad)


def test_trained_base_biases(env, tmp_path):
    bad = copy_good(env, tmp_path)
    edit_config(bad, bias="lora_only")
    refused(spec_for(env, tmp_path, bad), "invalid_spec", "bias='lora_only'", bad)


@pytest.mark.parametrize("change,needle", [
    ({"peft_type": "IA3"}, "peft_type 'IA3'"),
    ({"init_lora_weights": "pissa_niter_4"}, "rewritten base weights"),
    ({"use_qalora": True}, "QA-LoRA"),
    ({"use_something_new": True}, "use_something_new"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_config_refusals(env, tmp_path, change, needle):
    bad = copy_good(env, tmp_path)
    edit_config(bad, **change)
    refused(spec_for(env, tmp_path, bad), "invalid_spec", needle, bad, param="models[1].model")


def test_adapter_output_with_full_model_input(env, tmp_path):
    full = make_full_finetune(env["base"], str(tmp_path / "full"), seed=3)
    refused({"base_model": env["base"], "models": [env["good"], full], "output": str(tmp_path / "out"),
             "output_format": "adapter"}, "invalid_spec", "models[1]", full, "full checkpoint", param="models[1].model")


def test_shape_mismatch(env, tmp_path):
    from tests.support.lora_helpers import TINY_LLAMA

    other = str(tmp_path / "other_base")
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "intermediate_size": 128})).save_pretrained(other)
    bad = make_adapter(other, str(tmp_path / "bad"), seed=4, r=4, target_modules=["up_proj"])
    refused(spec_for(env, tmp_path, bad), "incompatible_checkpoints", bad, "model.layers.0.mlp.up_proj",
            "128x64", "96x64", param="models[1].model")
    # Without a base (adapter output), adapters are checked against each other.
    good_up = variant(env, "good_up", target_modules=["up_proj"])
    refused({"models": [good_up, bad], "output": str(tmp_path / "out"), "output_format": "adapter"},
            "incompatible_checkpoints", "model.layers.0.mlp.up_proj", bad, good_up)


def test_unknown_module(env, tmp_path):
    from tests.support.lora_helpers import TINY_LLAMA

    deeper = str(tmp_path / "deeper_base")
    import transformers

    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LLAMA, "num_hidden_layers": 3})).save_pretrained(deeper)
    bad = make_adapter(deeper, str(tmp_path / "bad"), seed=5, r=4, target_modules=["q_proj"])
    refused(spec_for(env, tmp_path, bad), "incompatible_checkpoints", bad, "model.layers.2.self_attn.q_proj",
            "matches no tensor")


def test_rank_disagrees_with_config(env, tmp_path):
    bad = copy_good(env, tmp_path)
    edit_config(bad, r=16)
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", "r=16", "rank 4", bad)


def test_non_finite_factors(env, tmp_path):
    bad = copy_good(env, tmp_path)
    f = os.path.join(bad, "adapter_model.safetensors")
    tensors = load_file(f)
    tensors[f"base_model.model.{Q0}.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, f)
    refused(spec_for(env, tmp_path, bad), "non_finite_weights", bad, f"{Q0}.weight", param="models[1]")


def test_pickle_only_adapter(env, tmp_path):
    bad = copy_good(env, tmp_path)
    os.rename(os.path.join(bad, "adapter_model.safetensors"), os.path.join(bad, "adapter_model.bin"))
    refused(spec_for(env, tmp_path, bad), "input_not_found", "adapter_model.bin", bad)


def test_base_must_not_be_an_adapter(env, tmp_path):
    refused({"base_model": env["good"], "models": [env["good"]], "output": str(tmp_path / "out"),
             "method": "task_arithmetic"}, "invalid_spec", "is a LoRA adapter", param="base_model")


def test_full_output_needs_the_base(env, tmp_path):
    refused({"models": [env["good"], env["good"]], "output": str(tmp_path / "out"), "method": "linear"},
            "invalid_spec", "needs base_model", param="base_model")
    with pytest.raises(MergeError, match="base_model"):
        parse_spec({"models": [env["good"]], "output": str(tmp_path / "out")})
    # ...but an adapter output does not.
    parse_spec({"models": [env["good"]], "output": str(tmp_path / "out"), "output_format": "adapter"})
    with pytest.raises(MergeError) as e:  # a misspelt output_format is named as such, not as a missing base
        parse_spec({"models": [env["good"]], "output": str(tmp_path / "out"), "output_format": "adaptor"})
    assert e.value.param == "output_format"


def test_adapter_rank_only_with_adapter_output(tmp_path):
    with pytest.raises(MergeError) as e:
        parse_spec({"base_model": "b", "models": ["a"], "output": "o", "adapter_rank": 8})
    assert e.value.code == "invalid_spec" and e.value.param == "adapter_rank"


def test_bad_rank_pattern_regex(env, tmp_path):
    bad = copy_good(env, tmp_path)
    edit_config(bad, rank_pattern={"q_proj(": 2})
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", "rank_pattern", "q_proj(", bad)


# ---------------------------------------------------------------- hostile configs (issue 18, items 3 and 4)
# An adapter_config.json is a file from the user's bucket: its rank_pattern/alpha_pattern
# keys are regular expressions the engine compiles and matches against every module, so
# they go through the same guarded compile and time-bounded match as the spec's select
# patterns (drmerge/patterns.py), with corrupt_checkpoint as the code.

COMPILE_BOMB = "(?:(?:(?:a{99}){99}){99}){99}"  # 31 bytes; compiling it grows memory for minutes


@pytest.mark.parametrize("mapping", ["rank_pattern", "alpha_pattern"])
def test_a_compile_bomb_key_is_refused_before_it_is_compiled(env, tmp_path, mapping):
    import time

    bad = copy_good(env, tmp_path)
    edit_config(bad, **{mapping: {"q_proj": 4, COMPILE_BOMB: 4}})
    t0 = time.monotonic()
    err = refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", bad, "adapter_config.json", mapping,
                  "repeats too much", param="models[1].model")
    assert time.monotonic() - t0 < 30, "the key was compiled (it takes minutes)"
    assert COMPILE_BOMB[:20] in err.message


def test_a_backtracking_key_is_stopped_by_the_match_timeout(env, tmp_path):
    bad = copy_good(env, tmp_path)
    # exponential in the module name's length (~30 characters): far over the 0.5 s bound
    edit_config(bad, rank_pattern={"(.*){1,32000}[bc]": 4})
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", bad, "rank_pattern", "backtracks",
            param="models[1].model")


def test_too_many_pattern_keys_are_refused_by_count(env, tmp_path):
    from drmerge.adapters import MAX_CONFIG_PATTERNS

    bad = copy_good(env, tmp_path)
    edit_config(bad, rank_pattern={f"layers.{i}.q": 4 for i in range(150_000)})  # ~3 MB, as found
    assert os.path.getsize(os.path.join(bad, "adapter_config.json")) > 2_000_000
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", bad, "rank_pattern has 150000 keys",
            str(MAX_CONFIG_PATTERNS), param="models[1].model")


def test_keys_that_together_unroll_too_far_are_refused(env, tmp_path):
    from drmerge.patterns import MAX_PATTERN_SIZE, MAX_TOTAL_PATTERN_SIZE

    bad = copy_good(env, tmp_path)
    each = MAX_PATTERN_SIZE // 2  # each key alone is fine
    keys = {f"x{i}a{{{each}}}": 4 for i in range(2 * MAX_TOTAL_PATTERN_SIZE // each)}
    edit_config(bad, alpha_pattern=keys)
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", bad, "adapter_config.json",
            f"more than {MAX_TOTAL_PATTERN_SIZE} elements", param="models[1].model")


def test_an_oversized_config_is_refused_unread(env, tmp_path):
    from drmerge.adapters import MAX_ADAPTER_CONFIG_BYTES

    bad = copy_good(env, tmp_path)
    with open(os.path.join(bad, "adapter_config.json"), "r+b") as f:
        f.truncate(MAX_ADAPTER_CONFIG_BYTES + 1)  # sparse: refused by its size, never parsed
    refused(spec_for(env, tmp_path, bad), "corrupt_checkpoint", bad, "adapter_config.json",
            str(MAX_ADAPTER_CONFIG_BYTES), param="models[1].model")


def test_pattern_keys_still_resolve_like_peft(env, tmp_path):
    """The guarded compile changes nothing for real keys: a module's rank comes from the
    first key that matches it, as before (and as PEFT does)."""
    adapter = variant(env, "ranked", target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                      alpha_pattern={"v_proj": 6})
    result = merge({"base_model": env["base"], "models": [env["good"], adapter], "output": str(tmp_path / "out"),
                    "method": "task_arithmetic"}, device="cpu")
    assert result.tensors > 0
    from drmerge.adapters import AdapterReader
    from drmerge.storage import LocalStorage

    reader = AdapterReader(LocalStorage(adapter), "a")
    v = reader.modules["model.layers.0.self_attn.v_proj"]
    q = reader.modules[Q0]
    assert (v.rank, v.alpha, q.rank) == (2, 6.0, 4)
