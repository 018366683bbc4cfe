"""The method registry (drmerge/methods): one file per method, discovered; each method's
parameters validated by its own class, so a parameter that does not apply to the method
is an error naming it (never ignored), through the spec parser and the CLI; the API's
JSON Schema generated from the same classes; a new method is one new file."""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
import textwrap

import pytest

from drmerge import methods
from drmerge.cli import main
from drmerge.errors import MergeError
from drmerge.spec import parse_spec

from tests.support.checkpoints import make_family

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = list(methods.names())  # every registered method: a new one is tested here too


def foreign(method) -> list[str]:
    """Every parameter some other registered method takes and ``method`` does not."""
    own = set(method.Params.model_fields)
    return sorted({k for m in methods.all_methods() for k in m.Params.model_fields} - own)


def sample(key: str):
    """A valid value of parameter ``key`` for a method that takes it (its default)."""
    return next(m.Params().model_dump()[key] for m in methods.all_methods() if key in m.Params.model_fields)


def spec_for(method: str, **kw) -> dict:
    s = {"base_model": "base", "models": ["a", "b"], "output": "out", "method": method}
    s.update(kw)
    return s


def test_every_method_module_is_registered_once():
    modules = sorted(i.name for i in pkgutil.iter_modules(methods.__path__) if i.name != "base")
    assert sorted(methods.names()) == sorted(methods.get(n).name for n in methods.names())
    assert len(modules) == len(methods.names()) and {"drm", "ties", "task_arithmetic", "linear"} <= set(methods.names())
    for m in methods.all_methods():
        assert m.Params.model_config["extra"] == "forbid" and m.summary


@pytest.mark.parametrize("name", METHODS)
def test_a_parameter_of_another_method_is_invalid_spec_naming_it(name):
    method = methods.get(name)
    keys = foreign(method)
    assert keys
    for key in keys:
        with pytest.raises(MergeError) as err:
            parse_spec(spec_for(name, parameters={key: sample(key)}))
        assert err.value.code == "invalid_spec" and err.value.param == f"parameters.{key}"
        assert f"does not apply to method {name!r}" in err.value.message, err.value.message
    # ...also among parameters that do apply: the foreign one is named, nothing is dropped
    own = method.Params().model_dump()
    for key in keys:
        with pytest.raises(MergeError) as err:
            parse_spec(spec_for(name, parameters={**own, key: sample(key)}))
        assert err.value.param == f"parameters.{key}"


def test_the_issue_example_and_messages_say_what_is_allowed():
    with pytest.raises(MergeError) as err:
        parse_spec(spec_for("task_arithmetic", parameters={"drop_rate": 0.5, "direction": "horizontal"}))
    assert err.value.param == "parameters.drop_rate"
    assert err.value.message == ("parameters.drop_rate: does not apply to method 'task_arithmetic' (its parameters: "
                                 "scale; drop_rate is a parameter of drm)")
    cases = [("drm", {"drop_rate": 3}, "parameters.drop_rate: must be >= 0.0 and < 1.0, got 3.0"),
             ("ties", {"density": 0}, "parameters.density: must be > 0.0 and <= 1.0, got 0.0"),
             ("drm", {"direction": "diagonal"}, "parameters.direction: must be one of vertical, horizontal, "
                                                "auto, got 'diagonal'"),
             ("ties", {"sign_election": 1}, "parameters.sign_election: must be true or false, got 1"),
             ("task_arithmetic", {"scale": "2"}, "parameters.scale: must be a finite number, got '2'"),
             ("linear", {"scale": 2.0}, "parameters.scale: does not apply to method 'linear' (it takes no "
                                        "parameters; scale is a parameter of drm, task_arithmetic, ties)"),
             ("drm", {"dropout": 0.1}, "parameters.dropout: unknown key (its parameters: direction, auto_rule, "
                                       "drop_rate, rank_threshold, scale, sign_election, disjoint_mean, "
                                       "nonlinear_drop_rate, nonlinear_trim, renormalize)")]
    for method, params, message in cases:
        with pytest.raises(MergeError) as err:
            parse_spec(spec_for(method, parameters=params, **({"base_model": None} if method == "linear" else {})))
        assert err.value.message == message
        assert err.value.param == message.split(":")[0]


@pytest.mark.parametrize("name", METHODS)
def test_validate_cli_refuses_foreign_parameters(name, tmp_path, capsys):
    for key in foreign(methods.get(name)):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps(spec_for(name, parameters={key: sample(key)})))
        assert main(["validate", str(path), "--json"]) == 1
        error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
        assert error["code"] == "invalid_spec" and error["param"] == f"parameters.{key}"


def test_validate_in_its_own_process_exits_non_zero_naming_the_key(tmp_path):
    """The real console entry point (once: a process start costs seconds)."""
    path = tmp_path / "spec.yaml"
    path.write_text("method: task_arithmetic\nbase_model: base\nmodels: [a, b]\noutput: out\n"
                    "parameters: {drop_rate: 0.5, direction: horizontal}\n")
    run = subprocess.run([sys.executable, "-m", "drmerge", "validate", str(path)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: invalid_spec: parameters.drop_rate: does not apply to method 'task_arithmetic'")


@pytest.mark.parametrize("name", METHODS)
def test_to_dict_holds_the_methods_own_parameters_with_defaults(name):
    spec = parse_spec(spec_for(name))
    params = spec.to_dict()["parameters"]
    assert params == methods.get(name).Params().model_dump()
    assert set(params) == set(methods.get(name).Params.model_fields)
    assert parse_spec(spec.to_dict()) == spec  # the normalized form parses back to itself


def test_the_api_schema_is_generated_from_the_registry():
    jsonschema = pytest.importorskip("jsonschema")
    from service.schemas import _spec_schema

    schema = _spec_schema()
    assert schema["properties"]["method"]["enum"] == list(methods.names())
    validator = jsonschema.Draft202012Validator(schema)
    s3 = {"base_model": "s3://bkt-x/b/", "models": ["s3://bkt-x/a/"], "output": "s3://bkt-x/o/"}
    for m in methods.all_methods():
        assert validator.is_valid(dict(s3, method=m.name, parameters=m.Params().model_dump())), m.name
        for key in foreign(m):
            assert not validator.is_valid(dict(s3, method=m.name, parameters={key: sample(key)})), (m.name, key)
    assert validator.is_valid(dict(s3, parameters={"drop_rate": 0.5}))  # no method: the default's parameters
    assert not validator.is_valid(dict(s3, parameters={"density": 0.5}))


def test_registry_spec_and_schema_never_import_torch():
    code = ("import sys, json\nfrom drmerge import methods\nfrom drmerge.spec import parse_spec\n"
            "from service.schemas import _spec_schema\n_spec_schema()\n"
            "[parse_spec({'base_model': 'b', 'models': ['a'], 'output': 'o', 'method': n}) for n in methods.names()]\n"
            "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []


NEW_METHOD = '''
"""A method added as one file: the mean of the task deltas, each trimmed to its top
``keep`` magnitudes (a parameter given per model), scaled."""
from pydantic import Field

from drmerge.methods.base import Divide, ElementwiseRule, MergeMethod, Params, Sign


class MeanParams(Params):
    scale: float = Field(1.0)
    keep: float = Field(1.0, gt=0.0, le=1.0)


class Mean(MergeMethod):
    name = "mean_of_deltas"
    Params = MeanParams
    summary = "W0 + lam * mean_t top_keep(D_t)."
    per_model = ("keep",)

    def elementwise_rule(self, kind, params, models=None):
        keep = models["keep"] if models is not None else params.keep
        return ElementwiseRule(keep=keep, sign=Sign.NONE, divide=Divide.MODELS, scale=params.scale)


METHOD = Mean()
'''


def test_a_new_method_is_one_file(tmp_path, monkeypatch):
    """Dropped into the methods package (here: a folder added to its search path), a module
    is a method the spec accepts, the schema lists and the engine merges."""
    import torch
    from safetensors.torch import load_file

    from drmerge import merge

    folder = tmp_path / "more_methods"
    folder.mkdir()
    (folder / "mean_of_deltas.py").write_text(textwrap.dedent(NEW_METHOD))
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(folder)])
    monkeypatch.setattr(methods, "_REGISTRY", {})
    monkeypatch.delitem(sys.modules, "drmerge.methods.mean_of_deltas", raising=False)
    assert "mean_of_deltas" in methods.names()
    from service.schemas import _spec_schema

    assert "mean_of_deltas" in _spec_schema()["properties"]["method"]["enum"]
    with pytest.raises(MergeError) as err:
        parse_spec(spec_for("mean_of_deltas", parameters={"density": 0.5}))
    assert err.value.param == "parameters.density"
    family = make_family(str(tmp_path / "ckpt"), n_models=2)
    spec = {"base_model": family["base"], "models": [family["ft-1"], family["ft-2"]], "method": "mean_of_deltas",
            "parameters": {"scale": 0.5, "keep": 0.5}, "output": str(tmp_path / "merged")}
    from drmerge.inputs import Inputs
    from drmerge.kernels.topk import keep_top_magnitudes

    inputs = Inputs(parse_spec(spec))
    merged = [tp for tp in inputs.plan.tensors if tp.params is not None]
    inputs.close()
    assert merged and all(tp.models.values == {"keep": (0.5, 0.5)} for tp in merged)  # the per-model seam
    merge(spec, device="cpu")
    got = load_file(os.path.join(spec["output"], "model.safetensors"))
    base = load_file(os.path.join(family["base"], "model.safetensors"))
    fts = [load_file(os.path.join(family[f"ft-{i}"], "model.safetensors")) for i in (1, 2)]
    for name, b in base.items():
        kept = [keep_top_magnitudes(ft[name] - b, 0.5) for ft in fts]
        assert torch.allclose(got[name], b + 0.5 * (kept[0] + kept[1]) / 2, atol=1e-6), name
