"""Normalisation statistics and classification heads (docs/DESIGN.md, "Which tensors").

BatchNorm's running_mean / running_var are never sign-elected, trimmed or scaled: every
method merges them to the weighted mean of the models' values (so a variance stays
positive); num_batches_tracked is copied from the base. The default exclusion catches
the task heads of transformers and timm-style models, anchored where ``head``/``fc`` would
otherwise catch pretrained layers inside vision towers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from drmerge import methods
from drmerge.checkpoint import TensorInfo
from drmerge.cli import main
from drmerge.errors import MergeError
from drmerge.methods.base import COPY, MATRIX, STATISTIC, VECTOR
from drmerge.pipeline import run_merge, validate
from drmerge.plan import Selector
from drmerge.spec import Select, parse_spec
from tests.support.checkpoints import write_checkpoint
from tests.support.factories import load_tensors

WEIGHTS = (1.0, 0.5, 2.0)


class Net(nn.Module):
    """A small CNN: two conv + BatchNorm blocks and a top-level ``fc`` head (ResNet's names)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A base and three 'fine-tunes' whose weights moved and whose running statistics moved
    with them (train-mode passes over differently distributed data)."""
    root = tmp_path_factory.mktemp("cnn")
    torch.manual_seed(0)
    base = Net()
    base.train()
    with torch.no_grad():
        base(torch.randn(16, 3, 12, 12))
    paths = {"base": write_checkpoint(root / "base", {k: v.clone() for k, v in base.state_dict().items()},
                                      {"model_type": "toy-cnn"})}
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        ft = Net()
        ft.load_state_dict(base.state_dict())
        ft.train()
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
            for _ in range(3):
                ft(2.0 * (i + 1) * torch.randn(16, 3, 12, 12, generator=g) + i)
        paths[f"ft{i}"] = write_checkpoint(root / f"ft{i}", {k: v.clone() for k, v in ft.state_dict().items()},
                                           {"model_type": "toy-cnn"})
    return paths


def spec(cnn, out, method, weights=WEIGHTS, **kw):
    models = [{"model": cnn[f"ft{i}"], "weight": w} for i, w in enumerate(weights)]
    return {"base_model": cnn["base"], "models": models, "method": method, "output": str(out), **kw}


CASES = [(m, {"scale": 2.0} if "scale" in methods.get(m).Params.model_fields else {}) for m in methods.names()]
CASES += [("ties", {"density": 0.5})]


@pytest.mark.parametrize("method,parameters", CASES)
def test_statistics_are_the_weighted_mean_under_every_method(cnn, tmp_path, method, parameters):
    run_merge(parse_spec(spec(cnn, tmp_path / "o", method, parameters=parameters)), device="cpu")
    got = load_tensors(str(tmp_path / "o"))
    base = load_tensors(cnn["base"])
    fts = [load_tensors(cnn[f"ft{i}"]) for i in range(3)]
    stats = [n for n in base if n.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4
    for name in stats:
        values = [ft[name].double() for ft in fts]
        assert not torch.equal(values[0], base[name].double())  # the fine-tunes moved them
        want = sum(w * v for w, v in zip(WEIGHTS, values)) / sum(WEIGHTS)
        assert torch.allclose(got[name].double(), want, rtol=1e-6, atol=0), (method, name)
        if name.endswith("running_var"):
            assert bool((got[name] > 0).all())
    for name in ("bn1.num_batches_tracked", "bn2.num_batches_tracked"):
        assert torch.equal(got[name], base[name]) and not torch.equal(fts[0][name], base[name])
    if method == "task_arithmetic":  # the scale still applies to everything else
        name = "bn1.weight"
        want = base[name].double() + 2.0 * sum(w * (ft[name].double() - base[name].double())
                                               for w, ft in zip(WEIGHTS, fts))
        assert torch.allclose(got[name].double(), want, atol=1e-6)


def test_negative_weights_are_refused_when_statistics_are_merged(cnn, tmp_path):
    with pytest.raises(MergeError) as e:
        validate(parse_spec(spec(cnn, tmp_path / "o", "task_arithmetic", weights=(1.0, -1.0, 1.0))))
    assert e.value.code == "invalid_spec" and e.value.param == "models[1].weight"
    assert "bn1.running_mean" in e.value.message and "select.ignore" in e.value.message
    # keeping the base's statistics (select.ignore) makes the negation possible
    s = spec(cnn, tmp_path / "o", "task_arithmetic", weights=(1.0, -1.0, 1.0),
             select={"ignore": [r"(.*\.)?running_(mean|var)"]})
    run_merge(parse_spec(s), device="cpu")
    got, base = load_tensors(str(tmp_path / "o")), load_tensors(cnn["base"])
    assert torch.equal(got["bn1.running_var"], base["bn1.running_var"])


def test_validate_shows_statistics_and_the_excluded_head(cnn, tmp_path, capsys):
    report = validate(parse_spec(spec(cnn, tmp_path / "o", "drm")))
    assert report["kinds"] == {"matrix": 2, "vector": 8, "statistic": 4, "copy": 2}
    assert report["statistics"] == ["bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"]
    pattern = r"(timm_model\.)?(head|head_dist|aux_head|fc|_fc|last_linear|classif)\.(weight|bias)"
    assert report["excluded"] == {pattern: ["fc.weight"]}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(cnn, tmp_path / "o", "drm")))
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "statistics (the weighted mean of the models' values): 4 tensors (bn1.running_mean" in out
    assert f"excluded from the matrices by {pattern!r} (merged as vector-like): 1 tensor (fc.weight)" in out


HEADS = ["classifier.weight", "classifier.bias", "pre_classifier.weight", "classifier.dense.weight",
         "classifier.out_proj.weight", "distilbert.pre_classifier.weight", "cls_classifier.weight",
         "distillation_classifier.weight", "model.classification_head.dense.weight", "score.weight",
         "model.score.weight", "qa_outputs.weight", "head.weight", "head_dist.weight", "fc.weight", "_fc.weight",
         "last_linear.weight", "classif.weight", "aux_head.weight", "head.fc.weight", "head.fc.fc2.weight",
         "head.linear.weight", "head.proj.weight", "head.l.weight", "timm_model.head.fc.weight",
         "timm_model.fc.weight", "lm_head.weight", "embed_out.weight"]
PRETRAINED = ["vision_model.head.attention.in_proj_weight", "vision_model.head.mlp.fc1.weight",
              "vision_model.head.probe", "head.dense.weight", "head.norm.weight", "decoder.fc.weight",
              "encoder.layers.0.fc.weight", "model.layers.0.mlp.fc1.weight", "cls.predictions.transform.dense.weight",
              "cls.seq_relationship.weight", "blocks.0.mlp.fc2.weight", "model.layers.0.self_attn.q_proj.weight"]


def test_default_exclusion_catches_heads_not_pretrained_layers():
    selector = Selector(Select())
    for name in HEADS:
        assert selector.kind(TensorInfo(name, "F32", (4, 4), "", 0, 0)) == VECTOR, name
    for name in PRETRAINED:
        assert selector.kind(TensorInfo(name, "F32", (4, 4), "", 0, 0)) == (
            MATRIX if name.endswith("weight") else VECTOR), name
    for name, kind in [("bn.running_mean", STATISTIC), ("layer1.0.bn1.running_var", STATISTIC),
                       ("bn.num_batches_tracked", COPY)]:
        assert selector.kind(TensorInfo(name, "F32", (4,), "", 0, 0)) == kind, name


def test_drm_merges_the_conv_kernels_as_matrices(cnn, tmp_path):
    """The 4-D conv kernels stay DRM matrices (out x in*kh*kw), never transposed or split."""
    run_merge(parse_spec(spec(cnn, tmp_path / "o", "drm")), device="cpu")
    from tests.support.reference import drm_delta, rel_err

    got, base = load_tensors(str(tmp_path / "o")), load_tensors(cnn["base"])
    fts = [load_tensors(cnn[f"ft{i}"]) for i in range(3)]
    name = "conv2.weight"
    d = [(ft[name] - base[name]).reshape(8, -1).double().numpy() for ft in fts]
    want = drm_delta(d, WEIGHTS)
    assert rel_err((got[name] - base[name]).reshape(8, -1).double().numpy(), want) < 1e-5
    assert np.isfinite(got[name].numpy()).all()
