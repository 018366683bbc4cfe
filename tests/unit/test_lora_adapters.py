"""Reading real PEFT adapters: names, ranks, alphas, rsLoRA, rank/alpha patterns, GPT-2
Conv1D layers. PEFT's own ``merge_and_unload`` is the reference for every delta."""

from __future__ import annotations

import pytest
import torch

from drmerge.adapters import AdapterReader, bind_adapters, pattern_key
from drmerge.checkpoint import CheckpointReader
from drmerge.methods.drm import DrmParams, drm_lowrank_delta, drm_matrix_delta
from drmerge.storage import LocalStorage
from tests.support.lora_helpers import make_adapter, make_base, peft_deltas

CONFIGS = {
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "a2": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]),
    "a3": dict(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
               rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"up_proj": 3}),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_read")
    base = make_base(str(d / "base"))
    adapters = [make_adapter(base, str(d / name), seed=i + 1, **cfg) for i, (name, cfg) in enumerate(CONFIGS.items())]
    return base, adapters, peft_deltas(base, adapters)


def bound(base, adapters):
    ref = CheckpointReader(LocalStorage(base))
    readers = [AdapterReader(LocalStorage(a), f"models[{i}] ({a})") for i, a in enumerate(adapters)]
    bind_adapters(readers, {n: i.shape for n, i in ref.tensors.items()})
    return ref, readers


def test_pattern_key_follows_peft():
    from peft.utils.other import get_pattern_key

    keys = ["v_proj", r"layers\.1\.self_attn\.q_proj", "mlp.*proj", "q_proj"]
    for name in ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj",
                 "model.layers.3.mlp.up_proj", "model.layers.11.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]:
        want = get_pattern_key(keys, name)
        assert (pattern_key(keys, name) or name) == want


def test_deltas_equal_peft_merge(llama):
    base, adapters, deltas = llama
    ref, readers = bound(base, adapters)
    for t, reader in enumerate(readers):
        touched = set(reader.by_name)
        for name in ref.names():
            peft_delta = deltas[name][t]
            ours = reader.read(name)
            if ours is None:
                assert name not in touched and peft_delta.abs().max() == 0, name
                continue
            assert ours.dense().shape == peft_delta.shape
            err = (ours.dense().double() - peft_delta).norm() / peft_delta.norm()
            assert err < 1e-5, (reader.label, name, float(err))
    # rank_pattern / alpha_pattern / rsLoRA were read per module, as PEFT resolves them
    a2, a3 = readers[1], readers[2]
    m = a3.modules["model.layers.1.self_attn.q_proj"]
    assert (m.rank, m.scaling) == (6, 16 / 6)
    m = a3.modules["model.layers.0.self_attn.v_proj"]
    assert (m.rank, m.scaling) == (2, 8.0)
    m = a3.modules["model.layers.0.mlp.up_proj"]
    assert (m.rank, m.scaling) == (4, 0.75)
    m = a2.modules["model.layers.0.self_attn.k_proj"]
    assert (m.rank, m.scaling) == (8, pytest.approx(4 / 8 ** 0.5))


@pytest.mark.parametrize("direction", ["vertical", "horizontal"])
def test_lowrank_drm_equals_dense_on_peft_deltas(llama, direction):
    base, adapters, deltas = llama
    ref, readers = bound(base, adapters)
    w = torch.tensor([1.0, 0.7, 1.3])
    p = DrmParams(direction=direction)
    checked = 0
    for name in ref.names():
        factors = [r.read(name) for r in readers]
        if all(f is None for f in factors):
            continue
        shape = ref.tensors[name].shape
        want = drm_matrix_delta(torch.stack(deltas[name]), w.double(), p)
        for dtype, tol in ((torch.float64, 1e-5), (torch.float32, 1e-4)):
            got = drm_lowrank_delta([f.to(dtype=dtype) if f is not None else None for f in factors], shape, w, p)
            err = float((got.dense().double() - want).norm() / want.norm())
            assert err < tol, (name, dtype, err)
        checked += 1
    assert checked == 14  # 7 module kinds x 2 layers


def test_base_saved_without_task_prefix(llama, tmp_path):
    """A base saved as the bare model (``layers.0...``) still binds adapters made on the
    causal-LM wrapper (``model.layers.0...``)."""
    from transformers import AutoModel

    from tests.support.lora_helpers import quiet

    base, adapters, _ = llama
    quiet()
    AutoModel.from_pretrained(base).save_pretrained(str(tmp_path / "bare"))
    ref, readers = bound(str(tmp_path / "bare"), adapters[:1])
    assert "layers.0.self_attn.q_proj.weight" in readers[0].by_name
    assert all(n in ref.tensors for n in readers[0].by_name)


def test_gpt2_conv1d_layers(tmp_path):
    """GPT-2 stores Conv1D weights as in x out; PEFT's delta there is (B @ A)^T."""
    base = make_base(str(tmp_path / "base"), kind="gpt2")
    ad = make_adapter(base, str(tmp_path / "ad"), seed=5, r=4, lora_alpha=8, fan_in_fan_out=True,
                      target_modules=["c_attn", "c_proj", "c_fc"])
    deltas = peft_deltas(base, [ad])
    ref, (reader,) = bound(base, [ad])
    names = [n for n in ref.names() if reader.read(n) is not None]
    assert len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in 2 layers
    for name in names:
        ours = reader.read(name).dense().double()
        assert (ours - deltas[name][0]).norm() / deltas[name][0].norm() < 1e-5, name
