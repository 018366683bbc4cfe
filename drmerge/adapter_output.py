"""``output_format: adapter``: merge LoRA adapters into one new PEFT LoRA adapter.

Every adapted module's merged delta (the same ``D`` a full output adds to the base,
times ``lam``) is truncated to rank ``r`` by SVD (``kernels.lowrank.truncated``: for
DRM the delta is already factored as ``M V^T``, so this never forms it densely) and
written as ``lora_B`` (out x r) and ``lora_A`` (r x in) with ``lora_alpha = r``, i.e.
scaling 1. ``drmerge.json`` records, per module and overall, the fraction of the merged
delta's energy (squared Frobenius norm) the truncation kept.

Rank: ``adapter_rank`` if the spec gives it, else the sum of the input adapters' ranks
capped at ``DEFAULT_RANK_CAP``. Every module gets that same rank (serving stacks such as
multi-LoRA servers expect one rank per adapter); a module whose merged delta has lower
rank is padded with zero components, which changes nothing. Only a weight with a side
smaller than ``r`` gets a lower rank, through ``rank_pattern``/``alpha_pattern``.

The base model is only needed for its shapes and names: without ``base_model``, the
adapters' own shapes are used and must agree with each other. Its weights are never read.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import time
from dataclasses import asdict, dataclass

import torch

from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, AdapterReader
from .checkpoint import CODE_OF, DTYPES, OutTensor, ShardWriter, shard_header
from .errors import Cancelled, Interrupted, MergeError
from .execute import decisions_record, module_delta, resolve_device, resolve_pools
from .inputs import Inputs
from .kernels.lowrank import LowRank, truncated
from .methods.base import COPY
from .output import OutputTransaction
from .result import MergeResult, Progress, adapter_summary, decisions_summary
from .spec import MergeSpec

log = logging.getLogger(__name__)

DEFAULT_RANK_CAP = 64


def output_rank(spec: MergeSpec, adapters: list[AdapterReader]) -> int:
    if spec.adapter_rank is not None:
        return spec.adapter_rank
    return min(sum(a.max_rank for a in adapters), DEFAULT_RANK_CAP)


def _modules(inputs) -> list[tuple]:
    """``(tensor plan, PEFT module key, out_features, in_features, fan_in_fan_out)`` of every
    module some adapter adapts, in plan order."""
    owners: dict[str, object] = {}
    for ad in inputs.adapters:
        for name, mod in ad.by_name.items():
            owners.setdefault(name, mod)
    out = []
    for tp in inputs.plan.tensors:
        mod = owners.get(tp.name)
        if mod is not None and tp.kind != COPY:
            out.append((tp, mod.key, mod.b.shape[0], mod.a.shape[1], mod.fan_in_fan_out))
    return out


def _common(values, default=None):
    values = set(values)
    return values.pop() if len(values) == 1 else default


def adapter_config(spec: MergeSpec, adapters: list[AdapterReader], modules: list[tuple], rank: int,
                   ranks: dict[str, int], warnings: list[str]) -> dict:
    """A PEFT ``LoraConfig`` for the merged adapter (plain LoRA, scaling 1 everywhere)."""
    cfgs = [a.config for a in adapters]
    task_type = _common(c.get("task_type") for c in cfgs)
    if task_type is None and any(c.get("task_type") for c in cfgs):
        warnings.append("the input adapters disagree on task_type; the merged adapter has none")
    keys = [key for _, key, *_ in modules]
    all_keys = {k for a in adapters for k in a.modules}
    leaves = set()
    exact_by_leaves = set(keys) == all_keys
    for c in cfgs:
        tm = c.get("target_modules")
        if not isinstance(tm, list) or c.get("layers_to_transform") not in (None, []) or c.get("exclude_modules"):
            exact_by_leaves = False
            break
        leaves.update(tm)
    # Leaf names ("q_proj") when they select exactly the merged modules, as the inputs did;
    # else the full module names, which PEFT matches exactly.
    target_modules = sorted(leaves) if exact_by_leaves else sorted(keys)
    rank_pattern = {re.escape(k): r for k, r in ranks.items() if r != rank}
    base_name = _common(c.get("base_model_name_or_path") for c in cfgs) or spec.base_model
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_name,
        "revision": _common(c.get("revision") for c in cfgs),
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "target_modules": target_modules,
        "fan_in_fan_out": any(fifo for *_, fifo in modules),
        "bias": "none",
        "lora_dropout": 0.0,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
        "auto_mapping": json.loads(_common((json.dumps(c.get("auto_mapping"), sort_keys=True) for c in cfgs), "null")),
    }


@dataclass
class AdapterPlan:
    """What an adapter output will hold, known before merging (``run_adapter_merge`` writes
    it; ``pipeline.validate`` reports it)."""
    modules: list[tuple]  # see _modules
    rank: int  # the adapter's r
    ranks: dict[str, int]  # PEFT module key -> its rank (below r only for a side shorter than r)
    dtype: str  # safetensors dtype code of the factors
    tensors: list[OutTensor]  # lora_A and lora_B of every module, in file order

    @property
    def weights_bytes(self) -> int:
        """The size of ``adapter_model.safetensors``, header included."""
        return len(shard_header(self.tensors)) + sum(t.nbytes for t in self.tensors)


def plan_adapter_output(spec: MergeSpec, inputs) -> AdapterPlan:
    modules = _modules(inputs)
    if not modules:
        raise MergeError("invalid_spec", "no adapted module is merged (select.ignore keeps all of them at the base)",
                         param="select.ignore")
    rank = output_rank(spec, inputs.adapters)
    ranks = {key: min(rank, n_out, n_in) for _, key, n_out, n_in, _ in modules}
    dtypes = {a.dtype for a in inputs.adapters}
    code = CODE_OF[spec.dtype] if spec.dtype else (dtypes.pop() if len(dtypes) == 1 else "F32")
    planned = []
    for _, key, n_out, n_in, _ in modules:
        planned.append(OutTensor(f"{PEFT_PREFIX}{key}.lora_A.weight", code, (ranks[key], n_in)))
        planned.append(OutTensor(f"{PEFT_PREFIX}{key}.lora_B.weight", code, (n_out, ranks[key])))
    return AdapterPlan(modules, rank, ranks, code, planned)


def merged_module(inputs, tp, factors: list, device: torch.device, rank: int,
                  notes: dict | None = None) -> tuple[LowRank, float, float]:
    """Rank-``rank`` factors of ``lam * D`` for one module (base orientation), with the
    energy kept and total; ``notes`` receives what the method decided for it."""
    approx, kept, total = truncated(module_delta(inputs, tp, factors, device, notes), rank)
    scale = inputs.method.scale(tp.params)
    return LowRank(approx.left * scale, approx.right), kept, total


def run_adapter_merge(spec: MergeSpec, *, device: str = "auto", progress=None, should_cancel=None,
                      s3_options: dict | None = None, completed_shards: list[dict] | None = None,
                      on_shard=None, should_pause=None, owns_output=None):
    """``pipeline.run_merge`` for ``output_format: adapter``: same contract, hooks and output
    transaction (output.py).

    One difference: the adapter is one small file written at the end, so there are no
    shards to keep. A resumed run (``completed_shards`` given) returns an output already
    complete for this spec, else starts over; a pause keeps nothing. Committed files are
    still reported through ``on_shard`` so an abandoned run's leftovers can be removed.
    """
    started = time.perf_counter()
    created_at = _dt.datetime.now(_dt.timezone.utc).isoformat()
    dev = resolve_device(device)
    state = Progress()

    def report(stage: str | None = None) -> None:
        if stage:
            state.stage = stage
        if progress:
            progress(Progress(**asdict(state)))

    def check_stop() -> bool:  # planning's hook: a pause keeps nothing here, like a cancel
        if should_pause is not None and should_pause():
            raise Interrupted("the merge was interrupted while planning; nothing was written", kept=0)
        return should_cancel is not None and should_cancel()

    report("planning")
    inputs = Inputs(spec, s3_options, should_stop=check_stop)
    try:
        tx = OutputTransaction(spec, s3_options, completed_shards=completed_shards, on_shard=on_shard,
                               should_pause=should_pause, owns_output=owns_output, resumable=False)
    except BaseException:
        inputs.close()
        raise
    writer: ShardWriter | None = None
    timings = {"plan_s": 0.0, "read_wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "total_s": 0.0}
    try:
        done = tx.start(dev)
        if done is not None:
            report("done")
            return done
        tx.resume(inputs.fingerprint())
        warnings = list(inputs.plan.warnings)
        for warning in warnings:
            log.warning(warning)
        ap = plan_adapter_output(spec, inputs)
        modules, rank, ranks, out_dtype, planned = ap.modules, ap.rank, ap.ranks, DTYPES[ap.dtype][0], ap.tensors
        timings["plan_s"] = time.perf_counter() - started
        state.tensors_total = len(modules)
        tx.begin()
        if inputs.plan.pools:
            report("pooling")
            resolve_pools(inputs, [tp.name for tp, *_ in modules], inputs.poll)
            by_name = inputs.plan.by_name()
            modules = [(by_name[tp.name], *rest) for tp, *rest in modules]
        report("merging")
        writer = ShardWriter(tx.out, ADAPTER_WEIGHTS, planned)
        energy: dict[str, dict] = {}
        decisions: dict[str, dict] = {}
        kept_sum = total_sum = 0.0
        for tp, key, n_out, n_in, fifo in modules:
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            if should_pause is not None and should_pause():
                raise Interrupted("the merge was interrupted; an adapter output is written whole at the end, "
                                  "so nothing was kept", kept=0)
            t0 = time.perf_counter()
            factors = [m.read(tp.name) for m in inputs.models]
            state.bytes_read += sum(m.nbytes(tp.name) for m in inputs.models)
            t1 = time.perf_counter()
            notes: dict = {}
            approx, kept, total = merged_module(inputs, tp, factors, dev, ranks[key], notes)
            if notes:
                decisions[tp.name] = decisions_record(notes)
            b, a = (approx.right.T, approx.left.T) if fifo else (approx.left, approx.right)  # PEFT orientation
            k = approx.rank
            b_out = torch.zeros(n_out, ranks[key], dtype=out_dtype)
            a_out = torch.zeros(ranks[key], n_in, dtype=out_dtype)
            b_out[:, :k] = b.to("cpu", out_dtype)
            a_out[:k] = a.to("cpu", out_dtype)
            t2 = time.perf_counter()
            before = writer.size
            writer.add(f"{PEFT_PREFIX}{key}.lora_A.weight", a_out)
            writer.add(f"{PEFT_PREFIX}{key}.lora_B.weight", b_out)
            state.bytes_written += writer.size - before
            timings["read_wait_s"] += t1 - t0
            timings["compute_s"] += t2 - t1
            timings["write_s"] += time.perf_counter() - t2
            energy[key] = {"rank": ranks[key], "energy_kept": kept / total if total > 0 else 1.0}
            kept_sum, total_sum = kept_sum + kept, total_sum + total
            state.tensors_done += 1
            report()
        report("finalizing")
        files = [writer.commit()]
        writer = None
        tx.committed(files[0])
        config = adapter_config(spec, inputs.adapters, modules, rank, ranks, warnings)
        files.append(tx.write(ADAPTER_CONFIG, json.dumps(config, indent=2).encode(), report=True))
        seconds = time.perf_counter() - started
        timings["total_s"] = seconds
        result = MergeResult(output=spec.output, files=files, tensors=len(planned), bytes_read=state.bytes_read,
                             bytes_written=state.bytes_written, seconds=seconds,
                             timings={k: round(v, 4) for k, v in timings.items()}, warnings=warnings, device=str(dev),
                             resumed={"shards_kept": 0, "tensors_skipped": 0} if completed_shards is not None else None,
                             decisions=decisions_summary(decisions))
        adapter = {"rank": rank, "energy_kept": kept_sum / total_sum if total_sum > 0 else 1.0, "modules": energy}
        result.adapter = adapter_summary(adapter)
        tx.finish(result, created_at, {"adapter": adapter, **({"decisions": decisions} if decisions else {})})
        report("done")
        return result
    except BaseException as e:
        if writer is not None:
            writer.abort()
        tx.fail(e)
    finally:
        inputs.close()
        tx.close()
