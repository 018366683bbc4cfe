"""Side by side with the real mergekit 0.1.5 (installed by the test extra): the same
mergekit config run by mergekit and, translated, by drmerge, on the same tiny Llama
checkpoints, gives every tensor within 1e-5 of the merged delta (tests/support/mergekit_run.py)."""

from __future__ import annotations

import pytest

from tests.support.mergekit_run import (Case, Untranslatable, compare, drmerge_spec, load_tensors, mergekit_config, run_drmerge,
                           opposed_pair_family, run_mergekit, tiny_llama_family)

N_TENSORS = 21  # tiny Llama: embeddings, head, final norm, 9 per layer x 2


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_llama_family(str(tmp_path_factory.mktemp("mergekit_family")), n_models=4)


CASES = {
    # issue #13: unequal weights, one negative, density 0.5, lambda 0.7, normalize on
    "ties-weighted": Case("ties", (1.0, 0.3, 0.7, -0.5), {"lambda": 0.7, "normalize": True}, {"density": 0.5}),
    "ties-weighted-no-normalize": Case("ties", (1.0, 0.3, 0.7, -0.5), {"lambda": 0.7, "normalize": False},
                                       {"density": 0.5}),
    "ties-unit-weights": Case("ties", (1.0, 1.0, 1.0), {}, {"density": 0.3}),  # drmerge's unit-weight fast path
    "ties-defaults": Case("ties", (0.6, 1.4)),  # mergekit's defaults: density 1, normalize on, lambda 1
    "task_arithmetic": Case("task_arithmetic", (1.0, 0.3, -0.7), {"lambda": 0.7}),
    "linear-with-base": Case("linear", (1.0, 0.3, 0.7)),
    "linear-without-base": Case("linear", (1.0, 0.3, 0.7, 2.0), with_base=False),
}


@pytest.mark.parametrize("key", list(CASES))
def test_same_tensors_as_mergekit(family, tmp_path, key):
    result = compare(CASES[key], family, str(tmp_path))
    assert len(result.errors) == N_TENSORS
    assert min(result.delta_norms.values()) > 0  # every tensor really merged: nothing vacuous
    name, err = result.worst
    assert err <= 1e-5, (name, err)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.5)])
def test_ties_exactly_zero_weighted_sums_as_mergekit(tmp_path, weights):
    # Half of every tensor has weighted sums of exactly zero, the rest negative sums:
    # mergekit elects +1 there (keeping the positive entry, divided by its own weight),
    # where a tensor-wide fallback sign would be -1.
    family = opposed_pair_family(str(tmp_path / "family"), weights)
    result = compare(Case("ties", weights, {"lambda": 0.7}), family, str(tmp_path))
    assert len(result.errors) == N_TENSORS and min(result.delta_norms.values()) > 0
    name, err = result.worst
    assert err <= 1e-5, (name, err)


def test_the_comparison_sees_a_difference(family, tmp_path):
    # The harness itself: a drmerge spec one parameter away from the config is far off.
    case = CASES["ties-weighted"]
    mk = run_mergekit(mergekit_config(case, family), str(tmp_path / "mk"))
    spec = drmerge_spec(case, family, str(tmp_path / "dr"))
    spec["parameters"]["density"] = 0.6
    dr = run_drmerge(spec)
    base = load_tensors(family.base)
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = (mk[name].double() - base[name].double()).norm()
    assert float((dr[name].double() - mk[name].double()).norm() / delta) > 1e-2


def test_translations_refuse_what_drmerge_cannot_express(family):
    refused = [Case("ties", (1.0, 1.0), model_parameters=({"density": 0.5}, {"density": 0.3})),  # per-model density
               Case("ties", (1.0, 1.0), {"rescale": True}),
               Case("task_arithmetic", (1.0,), model_parameters={"density": 0.5}),  # mergekit ignores it
               Case("linear", (1.0,), {"normalize": False}),
               Case("ties", (1.0,), {"epsilon": 0.1})]
    for case in refused:
        with pytest.raises(Untranslatable):
            drmerge_spec(case, family, "unused")
