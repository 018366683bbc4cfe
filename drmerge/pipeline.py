"""A full-output merge end to end: plan -> prefetch -> merge -> write, one tensor at a time.

Memory stays bounded by a few tensors times the number of models: a small pool of
reader threads fetches the next ``PREFETCH`` tensors of every model while the current
one is merged (execute.py), and a writer thread streams finished tensors into the shard
that is open (headers are planned up front, so shards are written front to back).
Between tensors the cancel hook is polled. Everything written goes through one output
transaction (output.py): on any failure what this run wrote is removed, and
``drmerge.json``, the completeness marker, is only ever written last. If that removal
fails too (the storage is unreachable), the run still raises its original error,
carrying ``cleanup_pending`` (what may remain): the service removes it later with
``discard_partial_output``, retrying until it succeeds.

Resume: each committed shard is reported (``on_shard``: name, size, sha256 and a plan
fingerprint) and a later run given those entries as ``completed_shards`` reads them back,
keeps the ones that verify and merges only the tensors of the other shards. Merging is
deterministic, so a resumed output equals an uninterrupted one byte for byte (except the
timings in ``drmerge.json``). ``should_pause`` stops between tensors like a cancel but
keeps what was committed (``Interrupted``).

``output_format: adapter`` (one PEFT LoRA adapter instead of a checkpoint) is
adapter_output.py, through the same transaction.
"""

from __future__ import annotations

import datetime as _dt
import logging
import queue
import threading
import time
from dataclasses import asdict
from typing import Callable

import torch

from .checkpoint import INDEX_FILE, ShardWriter, index_json, shard_header, shard_names
from .errors import Interrupted
from .execute import limit_malloc_arenas, merged_tensors, resolve_device, resolve_pools
from .inputs import Inputs
from .output import OutputTransaction, discard_partial_output, preflight  # noqa: F401 (discard_partial_output: API)
from .methods.base import MATRIX, STATISTIC
from .plan import Plan
from .result import CancelFn, MergeResult, Progress, ProgressFn, decisions_summary
from .spec import MergeSpec
from .storage import Storage, open_storage

log = logging.getLogger(__name__)


def run_merge(spec: MergeSpec, *, device: str = "auto", progress: ProgressFn | None = None,
              should_cancel: CancelFn | None = None, s3_options: dict | None = None,
              completed_shards: list[dict] | None = None, on_shard: Callable[[dict], None] | None = None,
              should_pause: CancelFn | None = None, owns_output: CancelFn | None = None) -> MergeResult:
    """Merge ``spec`` end to end and return what was written. Raises ``MergeError``.

    ``completed_shards`` (a list, even empty) makes this a resumed run: unfinished uploads
    left in the output are aborted, recorded shards that verify are kept and their tensors
    skipped, and an output already complete for this spec is returned as it is.
    ``on_shard(entry)`` is called (on the writer thread) after each shard is committed.
    ``should_pause()`` is polled between tensors; when true the run stops, keeps its
    committed shards and raises ``Interrupted`` (also raised, instead of cleaning up, if a
    failure happens while a pause is requested: the output may belong to a newer run).
    ``owns_output()`` is asked once before a failed run deletes what it wrote: false (or
    an exception) keeps everything and raises ``Interrupted``. The service answers it from
    the job record, so a worker that lost its job to a newer attempt never deletes shards
    that attempt has verified and kept.
    """
    if spec.output_format == "adapter":  # a PEFT adapter instead of a checkpoint: adapter_output.py
        from .adapter_output import run_adapter_merge

        return run_adapter_merge(spec, device=device, progress=progress, should_cancel=should_cancel,
                                 s3_options=s3_options, completed_shards=completed_shards, on_shard=on_shard,
                                 should_pause=should_pause, owns_output=owns_output)
    limit_malloc_arenas()
    started = time.perf_counter()
    created_at = _dt.datetime.now(_dt.timezone.utc).isoformat()
    dev = resolve_device(device)
    state = Progress()
    lock = threading.Lock()

    def report(stage: str | None = None) -> None:
        if stage:
            state.stage = stage
        if progress:
            with lock:
                snapshot = Progress(**asdict(state))
            progress(snapshot)

    def add_read(n: int) -> None:
        with lock:
            state.bytes_read += n

    def add_written(n: int) -> None:
        with lock:
            state.bytes_written += n

    def check_stop() -> bool:
        if should_cancel is not None and should_cancel():
            return True
        if should_pause is not None and should_pause():
            raise Interrupted()
        return False

    report("planning")
    inputs = Inputs(spec, s3_options, should_stop=check_stop)
    try:
        tx = OutputTransaction(spec, s3_options, completed_shards=completed_shards, on_shard=on_shard,
                               should_pause=should_pause, owns_output=owns_output)
    except BaseException:
        inputs.close()
        raise
    writer: _BackgroundWriter | None = None
    timings = {"plan_s": 0.0, "read_wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "total_s": 0.0}
    try:
        done = tx.start(dev)
        if done is not None:
            report("done")
            return done
        plan = inputs.plan
        names = shard_names(len(plan.shards))
        kept = tx.resume(inputs.fingerprint(), plan, names, plan.warnings, inputs.poll)
        for warning in plan.warnings:  # also logged, so a caller sees them if the merge fails later
            log.warning(warning)
        timings["plan_s"] = time.perf_counter() - started
        state.tensors_total = len(plan.tensors)
        state.tensors_done = sum(len(plan.shards[i]) for i in kept)
        tx.begin()
        todo = [t.name for i, shard in enumerate(plan.shards) if i not in kept for t in shard]
        if plan.pools:  # pooled trims (DRM's nonlinear_trim: global) need a pass over their tensors first
            report("pooling")
            resolve_pools(inputs, todo, inputs.poll)
        report("merging")
        # What the method decided per matrix (DRM's direction: auto): each shard's entry in
        # the journal carries its tensors' decisions, so a resumed run still records them all.
        decisions: dict[str, dict] = {}
        for entry in tx.kept_entries().values():
            if isinstance(entry.get("decisions"), dict):
                decisions.update(entry["decisions"])

        def commit(index: int, entry: dict) -> None:
            mine = {t.name: decisions[t.name] for t in plan.shards[index] if t.name in decisions}
            tx.committed(entry, extra={"decisions": mine} if mine else None)

        writer = _BackgroundWriter(tx.out, plan, add_written, skip=frozenset(kept), on_commit=commit)
        for tp, merged in merged_tensors(inputs, todo, dev, timings, add_read, check_stop, decisions):
            writer.put(tp.name, merged)
            state.tensors_done += 1
            report()
        report("finalizing")
        t0 = time.perf_counter()
        writer.finish()
        files = [kept.get(i) or writer.files[i] for i in range(len(plan.shards))]
        if len(plan.shards) > 1:
            files.append(tx.write(INDEX_FILE, index_json(plan.shards, writer.names)))
        files += tx.copy_small_files(inputs.reference, plan.warnings)
        timings["write_s"] = writer.busy_s + time.perf_counter() - t0
        seconds = time.perf_counter() - started
        timings["total_s"] = seconds
        result = MergeResult(output=spec.output, files=files, tensors=len(plan.tensors),
                             bytes_read=state.bytes_read, bytes_written=state.bytes_written,
                             seconds=seconds, timings={k: round(v, 4) for k, v in timings.items()},
                             warnings=list(plan.warnings), device=str(dev),
                             resumed={"shards_kept": len(kept), "tensors_skipped": len(plan.tensors) - len(todo)}
                             if completed_shards is not None else None, decisions=decisions_summary(decisions))
        tx.finish(result, created_at, {"decisions": dict(sorted(decisions.items()))} if decisions else None)
        report("done")
        return result
    except BaseException as e:
        if writer is not None:
            try:
                writer.finish()  # aborts the shard in progress
            except BaseException:
                pass
        tx.fail(e)
    finally:
        inputs.close()
        tx.close()


class _BackgroundWriter:
    """Writes merged tensors into planned shards on its own thread (bounded queue)."""

    def __init__(self, storage: Storage, plan: Plan, on_bytes: Callable[[int], None],
                 skip: frozenset[int] | set[int] = frozenset(), on_commit: Callable[[int, dict], None] | None = None):
        self.storage = storage
        self.names = shard_names(len(plan.shards))
        self.shards = plan.shards
        self.skip = skip  # shard indexes kept from an earlier run: their tensors never arrive
        self.on_commit = on_commit
        self.files: dict[int, dict] = {}  # shard index -> {name, size, sha256}
        self.on_bytes = on_bytes
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.busy_s = 0.0
        self.thread = threading.Thread(target=self._run, name="drmerge-write", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        current: ShardWriter | None = None
        shard = 0
        try:
            while True:
                item = self.q.get()
                if item is None:
                    break
                t0 = time.perf_counter()
                name, tensor = item
                if current is None:
                    while shard in self.skip:
                        shard += 1
                    current = ShardWriter(self.storage, self.names[shard], self.shards[shard])
                before = current.size
                current.add(name, tensor)
                self.on_bytes(current.size - before)
                if current.full:
                    self.files[shard] = current.commit()
                    if self.on_commit is not None:  # the output transaction's ledger
                        self.on_commit(shard, self.files[shard])
                    current, shard = None, shard + 1
                self.busy_s += time.perf_counter() - t0
        except BaseException as e:  # handed to the main thread by put()/finish()
            self.error = e
            if current is not None:
                current.abort()
            while self.q.get() is not None:  # drain so the producer never blocks
                pass
            return
        if current is not None:
            current.abort()

    def put(self, name: str, tensor: torch.Tensor) -> None:
        if self.error:
            raise self.error
        self.q.put((name, tensor))

    def finish(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            raise self.error


def validate(spec: MergeSpec, s3_options: dict | None = None) -> dict:
    """Check a spec and its checkpoints' compatibility without merging anything, and say
    what the merge would write: ``files`` (weights first; ``drmerge.json`` comes last and
    is not listed, as in a result), ``tensors`` and ``output_bytes`` (weight files,
    headers included) of the output; for an adapter output, its modules and rank."""
    inputs = Inputs(spec, s3_options)
    try:
        out = open_storage(spec.output, s3_options)
        try:
            preflight(spec, out)
        finally:
            out.close()
        plan = inputs.plan
        if spec.output_format == "adapter":
            from .adapter_output import plan_adapter_output
            from .adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

            ap = plan_adapter_output(spec, inputs)
            kinds: dict[str, int] = {}
            for tp, *_ in ap.modules:
                kinds[tp.kind] = kinds.get(tp.kind, 0) + 1
            return {"output_format": "adapter", "tensors": len(ap.tensors), "modules": len(ap.modules),
                    "adapter_rank": ap.rank, "kinds": kinds, "shards": 1, "files": [ADAPTER_WEIGHTS, ADAPTER_CONFIG],
                    "output_bytes": ap.weights_bytes, **structure(spec, [tp for tp, *_ in ap.modules], plan),
                    "warnings": plan.warnings}
        kinds = {}
        for tp in plan.tensors:
            kinds[tp.kind] = kinds.get(tp.kind, 0) + 1
        files = shard_names(len(plan.shards)) + ([INDEX_FILE] if len(plan.shards) > 1 else [])
        files += inputs.reference.small_files()
        return {"output_format": "full", "tensors": len(plan.tensors), "kinds": kinds, "shards": len(plan.shards),
                "files": files,
                "output_bytes": sum(len(shard_header(shard)) + sum(t.nbytes for t in shard) for shard in plan.shards),
                **structure(spec, plan.tensors, plan), "warnings": plan.warnings}
    finally:
        inputs.close()


def structure(spec: MergeSpec, tensors, plan: Plan) -> dict:
    """What ``drmerge validate`` shows of the tensors' treatment beyond their kinds: the
    fused matrices split (by which rule or preset, into which parts), the matrices merged
    transposed, what each exclusion pattern turned from a matrix into a vector-like tensor,
    the normalisation statistics, the pooled trims, and what the method decides per matrix
    only at merge time (it needs the data: see drmerge.json's ``decisions``)."""
    splits: dict[str, dict] = {}
    transposed = []
    for tp in tensors:
        if tp.view is None:
            continue
        if tp.view.transposed:
            transposed.append(tp.name)
        if tp.view.parts:
            parts = tp.view.parts
            layout = (f"{'/'.join(p.name for p in parts)}: {'/'.join(str(p.size) for p in parts)} "
                      f"{'rows' if tp.view.axis == 'out' else 'columns'} of the linear map, "
                      f"{len(parts[0].ranges)} block(s) each")
            entry = splits.setdefault(tp.view.rule, {"parts": layout, "tensors": []})
            entry["tensors"].append(tp.name)
    matrices = sum(len(tp.view.parts) if tp.view is not None and tp.view.parts else 1
                   for tp in tensors if tp.kind == MATRIX)
    method = spec.merge_method
    return {"splits": splits, "transposed": transposed, "excluded": plan.excluded,
            "statistics": [tp.name for tp in tensors if tp.kind == STATISTIC],
            "pools": {k: {"keep": v, "tensors": sum(1 for tp in tensors if tp.pool == k)} for k, v in plan.pools.items()},
            "decided": {k: {"how": v, "matrices": matrices} for k, v in method.decided(spec.parameters).items()}}
