"""The streaming executor: prefetch -> merge -> write, one tensor at a time.

Memory stays bounded by a few tensors times the number of models: a small pool of
reader threads fetches the next ``PREFETCH`` tensors of every model while the current
one is merged, and a writer thread streams finished tensors into the shard that is
open (headers are planned up front, so shards are written front to back). Between
tensors the cancel hook is polled. On any failure everything this run wrote is
removed, and ``drmerge.json``, the completeness marker, is only ever written last.
If that removal fails too (the storage is unreachable), the run still raises its original
error, carrying ``cleanup_pending`` (what may remain): the service removes it later with
``discard_partial_output``, retrying until it succeeds.

Resume: each committed shard is reported (``on_shard``: name, size, sha256 and a plan
fingerprint) and a later run given those entries as ``completed_shards`` reads them back,
keeps the ones that verify and merges only the tensors of the other shards. Merging is
deterministic, so a resumed output equals an uninterrupted one byte for byte (except the
timings in ``drmerge.json``). ``should_pause`` stops between tensors like a cancel but
keeps what was committed (``Interrupted``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import math
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator

import torch

from . import __version__
from .adapters import AdapterReader, is_adapter_dir, merge_with_adapters, plan_with_adapters
from .checkpoint import (DTYPES, INDEX_FILE, MAX_SMALL_FILE_BYTES, CheckpointReader, ShardWriter, index_json,
                         shard_header, shard_names)
from .errors import Cancelled, Interrupted, MergeError, StopPoll
from .kernels.elementwise import merge_elementwise
from .methods.base import COPY, Op
from .plan import Plan, TensorPlan, build_plan
from .spec import MergeSpec
from .storage import Storage, open_storage

log = logging.getLogger(__name__)

MARKER = "drmerge.json"
PREFETCH = 2  # tensors read ahead of the one being merged
# An element-wise tensor whose inputs (base + models, as stored) exceed this is not read
# ahead whole but read chunk by chunk as it is merged (LazyTensor).
LAZY_INPUT_BYTES = 256 * 2**20
COMPUTE_DTYPE = torch.float32
VERIFY_CHUNK = 16 * 1024 * 1024  # read-back size when verifying a kept shard


@dataclass
class Progress:
    stage: str = "planning"
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


@dataclass
class MergeResult:
    output: str
    files: list[dict]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    timings: dict
    warnings: list[str] = field(default_factory=list)
    device: str = "cpu"
    resumed: dict | None = None  # {"shards_kept", "tensors_skipped"} when a run resumed
    adapter: dict | None = None  # adapter output: {"rank", "energy_kept"} (per module: drmerge.json)

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MergeError("invalid_spec", "device 'cuda' was requested but no CUDA device is available", param="device")
    if device not in ("cpu", "cuda"):
        raise MergeError("invalid_spec", f"device must be auto, cpu or cuda, got {device!r}", param="device")
    return torch.device(device)


class Inputs:
    """Open readers for the base (if any) and every model, with the plan over them."""

    def __init__(self, spec: MergeSpec, s3_options: dict | None = None, should_stop: CancelFn | None = None):
        """``should_stop`` is the run's cancel hook (the service's also says when the time
        limit is up): planning asks it between reads and while it loops over tensors and
        patterns (errors.StopPoll), so a cancel or a deadline takes effect before merging."""
        self.spec = spec
        self.storages: list[Storage] = []
        self.poll = StopPoll(should_stop)
        try:
            self.base = self._open(spec.base_model, s3_options) if spec.base_model else None
            self.models = [self._open(m.model, s3_options, i) for i, m in enumerate(spec.models)]
            uris = [m.model for m in spec.models]
            self.adapters = [m for m in self.models if isinstance(m, AdapterReader)]
            if self.adapters or spec.output_format == "adapter":  # LoRA inputs: see adapters.py
                self.reference, self.plan = plan_with_adapters(spec, self.base, self.models, uris, self.poll)
            else:
                reference = self.base or self.models[0]
                self.reference = reference
                self.plan: Plan = build_plan(spec, reference, self.models if self.base else self.models[1:],
                                             uris if self.base else uris[1:], self.poll)
        except BaseException:
            self.close()
            raise
        self.weights = torch.tensor([m.weight for m in spec.models], dtype=COMPUTE_DTYPE)
        self._copied = {t.name for t in self.plan.tensors if t.kind == COPY}

    def _open(self, uri: str, s3_options, index: int | None = None) -> CheckpointReader | AdapterReader:
        self.poll()
        storage = open_storage(uri, s3_options)
        self.storages.append(storage)
        if is_adapter_dir(storage):
            if index is None:
                raise MergeError("invalid_spec", f"base_model {uri} is a LoRA adapter (it holds adapter_config.json); "
                                 "the base must be a full checkpoint", param="base_model")
            return AdapterReader(storage, f"models[{index}] ({uri})", param=f"models[{index}].model", poll=self.poll)
        return CheckpointReader(storage, self.poll)

    def read(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        base = self.base.read(name) if self.base else None
        return base, [m.read(name) for m in self.models]

    def read_copied(self, name: str) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """A tensor copied unchanged: only the reference holds it for sure (see build_plan)."""
        if self.base:
            return self.base.read(name), []
        return None, [self.reference.read(name)]

    def lazy(self, name: str) -> tuple[LazyTensor | None, list[LazyTensor]]:
        """Like ``read``, but leaves the data in storage (see LazyTensor)."""
        base = LazyTensor(self.base, name) if self.base else None
        return base, [LazyTensor(m, name) for m in self.models]

    def nbytes(self, name: str) -> int:
        """Bytes read for ``name``: every input's copy, or only the reference's for a copied tensor."""
        if name in self._copied:
            return self.reference.tensors[name].length
        readers = ([self.base] if self.base else []) + self.models
        return sum(r.nbytes(name) if isinstance(r, AdapterReader) else r.tensors[name].length for r in readers)

    def close(self) -> None:
        for s in self.storages:
            s.close()


class LazyTensor:
    """A tensor left in storage, read range by range while it is merged element-wise.

    Large tensors (embeddings, output heads) are merged this way so that their inputs are
    never all in memory at once: memory per tensor is a few chunks, whatever the vocabulary.
    Offers the slice of the tensor API that ``merge_elementwise`` uses on flat inputs.
    """

    def __init__(self, reader: CheckpointReader, name: str):
        self.reader, self.name = reader, name
        info = reader.tensors[name]
        self.shape = torch.Size(info.shape)
        self.dtype = DTYPES[info.dtype][0]

    def reshape(self, *shape) -> "LazyTensor":
        return self  # only ever used flat

    def numel(self) -> int:
        return self.shape.numel()

    def __getitem__(self, span: slice) -> torch.Tensor:
        return self.reader.read_elements(self.name, span.start, span.stop)

    def to(self, *args, **kwargs) -> torch.Tensor:
        """The whole tensor, read now (flat), then ``Tensor.to(*args, **kwargs)``."""
        return self.reader.read(self.name).reshape(-1).to(*args, **kwargs)


def _check_finite(spec: MergeSpec, name: str, base, tensors) -> None:
    # One sum over the stack in the common case (an inf or NaN entry makes it non-finite;
    # an overflowing sum only sends us to the exact check); per input only to name the culprit.
    if (base is None or _sum_finite(base)) and _sum_finite(tensors):
        return
    for label, t in ([("base_model", base)] if base is not None else []) + [
            (f"models[{i}] ({m.model})", x) for i, (m, x) in enumerate(zip(spec.models, tensors))]:
        if not bool(torch.isfinite(t).all()):
            raise MergeError("non_finite_weights", f"{label} has NaN or Inf values in tensor {name!r}", param=label.split(" ")[0])


def _sum_finite(t: torch.Tensor) -> bool:
    return math.isfinite(float(t.sum()))


def merge_one(inputs: Inputs, tp: TensorPlan, base: torch.Tensor | None, tensors: list[torch.Tensor],
              device: torch.device) -> torch.Tensor:
    """Merge one tensor (already read) and return it in its output dtype, on the CPU.

    Memory: element-wise merges run chunk by chunk (methods.elementwise); a DRM matrix
    is converted once into a preallocated float32 stack whose deltas are formed in place,
    and the buffers as read are released (``tensors`` is emptied) as soon as it is built.
    """
    spec = inputs.spec
    method, p = spec.merge_method, spec.parameters
    out_dtype = DTYPES[tp.out.dtype][0]
    if tp.kind == COPY:
        return (base if base is not None else tensors[0]).to(out_dtype)
    if inputs.adapters:  # some task deltas are LoRA factors (or absent): adapters.py
        return merge_with_adapters(inputs, tp, base, tensors, device).to(dtype=out_dtype).cpu()
    if method.operation(tp.kind, p) == Op.ELEMENTWISE:
        def check(b, stack):
            _check_finite(spec, tp.name, b, stack)
        return merge_elementwise(method.elementwise_rule(tp.kind, p), base, tensors, inputs.weights,
                                 compute_dtype=COMPUTE_DTYPE, device=device, out_dtype=out_dtype, check_finite=check)
    stack = torch.empty((len(tensors),) + tuple(tensors[0].shape), dtype=COMPUTE_DTYPE, device=device)
    for i, t in enumerate(tensors):
        stack[i].copy_(t)
    tensors.clear()
    b = base.to(device=device, dtype=COMPUTE_DTYPE)
    _check_finite(spec, tp.name, b, stack)
    stack -= b  # D_t, in place
    delta = method.dense_delta(tp.kind, stack, inputs.weights.to(device), p)
    del stack
    merged = delta.mul_(method.scale(p)).add_(b)  # W0 + lam * D, as merge_tensor computes it
    return merged.to(dtype=out_dtype).cpu()


def merged_tensors(inputs: Inputs, names: Iterable[str], device: torch.device,
                   timings: dict, progress_bytes: Callable[[int], None] | None = None,
                   should_cancel: CancelFn | None = None) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Merge any subset of tensors, in the given order, prefetching the next ones.

    This is the unit a merge can be split into across workers.
    """
    spec = inputs.spec
    plans = inputs.plan.by_name()
    order = [plans[n] for n in names]
    pool = ThreadPoolExecutor(max_workers=max(2, min(8, len(inputs.models) + 1)), thread_name_prefix="drmerge-read")
    pending: list[Future] = []
    try:
        def submit(i: int) -> None:
            tp = order[i]
            if tp.kind == COPY:
                pending.append(pool.submit(inputs.read_copied, tp.name))
            elif not inputs.adapters and spec.merge_method.operation(tp.kind, spec.parameters) == Op.ELEMENTWISE \
                    and inputs.nbytes(tp.name) > LAZY_INPUT_BYTES:
                pending.append(pool.submit(inputs.lazy, tp.name))
            else:
                pending.append(pool.submit(inputs.read, tp.name))

        for i in range(min(PREFETCH, len(order))):
            submit(i)
        for i, tp in enumerate(order):
            if should_cancel is not None and should_cancel():
                raise Cancelled()
            t0 = time.perf_counter()
            base, tensors = pending.pop(0).result()
            if i + PREFETCH < len(order):
                submit(i + PREFETCH)
            t1 = time.perf_counter()
            if progress_bytes:
                progress_bytes(inputs.nbytes(tp.name))
            merged = merge_one(inputs, tp, base, tensors, device)
            del base, tensors  # the buffers as read are not kept alive while the writer works
            timings["read_wait_s"] += t1 - t0
            timings["compute_s"] += time.perf_counter() - t1
            yield tp, merged
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


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
        self.written: list[str] = []  # committed objects, for cleanup on failure
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
                    self.written.append(current.name)
                    if self.on_commit is not None:
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


def _preflight_output(spec: MergeSpec, out: Storage) -> None:
    if out.exists(MARKER) and not spec.overwrite:
        raise MergeError("output_exists", f"{out.uri} already holds a merge ({MARKER}); "
                         "choose another output or set overwrite", param="output")


def plan_fingerprint(spec: MergeSpec, inputs: Inputs) -> str:
    """What a kept shard's bytes depend on: the spec (less ``overwrite``), the plan and
    where every input tensor lives. A journal entry from another fingerprint is ignored."""
    h = hashlib.sha256()
    s = spec.to_dict()
    s.pop("overwrite", None)
    h.update(json.dumps(s, sort_keys=True).encode())
    for tp in inputs.plan.tensors:
        h.update(json.dumps([tp.name, tp.kind, tp.out.dtype, list(tp.out.shape)]).encode())
    h.update(json.dumps([[t.name for t in shard] for shard in inputs.plan.shards]).encode())
    for reader in ([inputs.base] if inputs.base else []) + inputs.models:
        for name, info in sorted(getattr(reader, "tensors", {}).items()):
            inputs.poll()
            h.update(json.dumps([name, info.file, info.start, info.length, info.dtype]).encode())
        if isinstance(reader, AdapterReader):  # its factors' locations and its config (scaling)
            h.update(reader.fingerprint().encode())
    return h.hexdigest()


def _object_sha256(out: Storage, name: str, size: int) -> str:
    sha = hashlib.sha256()
    for off in range(0, size, VERIFY_CHUNK):
        sha.update(out.read_range(name, off, min(VERIFY_CHUNK, size - off)))
    return sha.hexdigest()


def _verified(out: Storage, name: str, size: int, sha256: str) -> str | None:
    """None if the object holds exactly ``size`` bytes hashing to ``sha256``, else why not."""
    try:
        got = out.size(name)
        if got != size:
            return f"it is {got} bytes, {size} were recorded"
        if _object_sha256(out, name, size) != sha256:
            return "its sha256 differs from the recorded one"
    except MergeError as e:
        return e.message
    return None


def _kept_shards(out: Storage, plan: Plan, names: list[str], completed: list[dict], fingerprint: str,
                 warnings: list[str], poll=None) -> dict[int, dict]:
    """The recorded shards that are still exactly what this run would write: shard index
    -> {name, size, sha256}. Each is read back in full (size and sha256), ``poll``
    (cancel, time limit) asked between them."""
    by_name = {e.get("name"): e for e in completed if isinstance(e, dict)}
    kept: dict[int, dict] = {}
    for i, (name, shard) in enumerate(zip(names, plan.shards)):
        if poll is not None:
            poll()
        entry = by_name.get(name)
        if entry is None:
            continue
        if entry.get("plan") != fingerprint:
            warnings.append(f"{name}: recorded by a run with other inputs or settings; rewriting it")
            continue
        size = len(shard_header(shard)) + sum(t.nbytes for t in shard)
        if entry.get("size") != size:
            warnings.append(f"{name}: recorded size {entry.get('size')} does not match the plan's {size}; rewriting it")
            continue
        why = _verified(out, name, size, str(entry.get("sha256")))
        if why:
            warnings.append(f"{name} did not verify ({why}); rewriting it")
            continue
        kept[i] = {"name": name, "size": size, "sha256": entry["sha256"]}
    return kept


def _finished_or_preflight(spec: MergeSpec, out: Storage, dev, resuming: bool) -> MergeResult | None:
    """Start of a run's writing side: a resumed run whose output is already complete gets
    its result back; otherwise the output must be free (or ``overwrite``)."""
    if resuming:
        done = _finished_output(spec, out, dev)
        if done is not None:
            return done
    _preflight_output(spec, out)
    return None


def _finished_output(spec: MergeSpec, out: Storage, dev) -> MergeResult | None:
    """A resumed run whose predecessor got as far as ``drmerge.json`` (and died before
    anyone heard of it): if that marker is for this very spec and every file it lists
    verifies, the merge is done."""
    try:
        if not out.exists(MARKER) or out.size(MARKER) > MAX_SMALL_FILE_BYTES:
            return None
        marker = json.loads(out.read_bytes(MARKER))
    except (MergeError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(marker, dict) or marker.get("spec") != json.loads(json.dumps(spec.to_dict())):
        return None
    files = marker.get("files") or []
    for f in files:
        if not isinstance(f, dict) or _verified(out, str(f.get("name")), f.get("size"), str(f.get("sha256"))):
            return None
    timings = marker.get("timings") or {}
    return MergeResult(output=spec.output, files=files, tensors=int(marker.get("tensors") or 0), bytes_read=0,
                       bytes_written=0, seconds=float(timings.get("total_s") or 0.0), timings=timings,
                       warnings=list(marker.get("warnings") or []), device=str(marker.get("device") or dev),
                       resumed={"shards_kept": len(files), "tensors_skipped": int(marker.get("tensors") or 0)},
                       adapter=adapter_summary(marker.get("adapter")))


def adapter_summary(adapter: dict | None) -> dict | None:
    """The part of drmerge.json's ``adapter`` record a result carries (not every module)."""
    if not isinstance(adapter, dict):
        return None
    return {"rank": adapter.get("rank"), "energy_kept": adapter.get("energy_kept")}


def remove_partial_output(out: Storage, names: list[str]) -> list[str]:
    """Remove what a failed run wrote (the objects ``names``, and any upload whose abort
    failed) and return what may remain: ``[]`` once nothing of the run is left.

    Runs on failure paths, so it never raises: an error here must not replace the run's
    own. It stops at the first failure (the storage is likely unreachable, and every
    further request would wait out its retries too) and reports everything not yet done."""
    pending = list(dict.fromkeys(names))
    try:
        if out.unaborted_writes():
            out.abort_stale_writes(strict=True)
        while pending:
            out.delete(pending[0])
            pending.pop(0)
    except Exception as e:
        left = list(dict.fromkeys(pending + out.unaborted_writes()))
        log.warning("could not remove the partial output in %s (%s); left for a later cleanup: %s",
                    out.uri, e, ", ".join(left)[:1000])
        return left
    return []


def _raise_failure(e: BaseException, left: list[str]):
    """Re-raise a failed run's error, carrying what its cleanup left (``cleanup_pending``);
    anything but a MergeError becomes ``internal_error``. Call inside ``except``."""
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    if isinstance(e, MergeError):
        e.cleanup_pending = list(left)
        raise e
    err = MergeError("internal_error", f"unexpected {e.__class__.__name__}: {e}")
    err.cleanup_pending = list(left)
    raise err from e


def discard_partial_output(spec: MergeSpec, shards: list[dict], s3_options: dict | None = None) -> list[str]:
    """Remove what a run that did not finish left in its output: the objects in
    ``shards`` (its recorded shards, and the names a failed run's own cleanup could not
    remove: ``MergeError.cleanup_pending``), its index and its pending uploads. A complete
    merge (``drmerge.json`` present) is left alone. Returns the names removed; raises
    MergeError if the storage fails, so that the caller knows to try again later."""
    out = open_storage(spec.output, s3_options)
    try:
        if out.exists(MARKER):
            return []
        out.abort_stale_writes(strict=True)
        removed = []
        for name in [e.get("name") for e in shards if isinstance(e, dict)] + [INDEX_FILE]:
            if isinstance(name, str) and name and "/" not in name and out.exists(name):
                out.delete(name)
                removed.append(name)
        _remove_empty_local_dir(out)
        return removed
    finally:
        out.close()


# glibc gives each thread that allocates its own malloc arena; the reader threads' large,
# short-lived buffers then fragment up to 8 x cores arenas and the process keeps memory it
# no longer uses (W1 DRM horizontal: peak RSS 1561-1678 MB with the default, 1015 MB with
# two arenas, same speed; bench/PERF.md). Set once, before the first reader thread starts,
# unless the environment chose (MALLOC_ARENA_MAX).
MALLOC_ARENAS = 2
_arenas_set = False


def _limit_malloc_arenas() -> None:
    global _arenas_set
    if _arenas_set:
        return
    _arenas_set = True
    import os
    import sys

    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX (glibc)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass


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
    _limit_malloc_arenas()
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
    out = open_storage(spec.output, s3_options)
    writer: _BackgroundWriter | None = None
    extra_written: list[str] = []
    kept: dict[int, dict] = {}
    timings = {"plan_s": 0.0, "read_wait_s": 0.0, "compute_s": 0.0, "write_s": 0.0, "total_s": 0.0}
    try:
        done = _finished_or_preflight(spec, out, dev, resuming=completed_shards is not None)
        if done is not None:
            report("done")
            return done
        plan = inputs.plan
        names = shard_names(len(plan.shards))
        fingerprint = plan_fingerprint(spec, inputs)
        if completed_shards is not None:
            dropped = out.abort_stale_writes()
            if dropped:
                log.info("aborted %d unfinished upload(s) left in %s by an earlier run", dropped, out.uri)
            kept = _kept_shards(out, plan, names, completed_shards, fingerprint, plan.warnings, inputs.poll)
        for warning in plan.warnings:  # also logged, so a caller sees them if the merge fails later
            log.warning(warning)
        timings["plan_s"] = time.perf_counter() - started
        state.tensors_total = len(plan.tensors)
        state.tensors_done = sum(len(plan.shards[i]) for i in kept)
        if spec.overwrite and not kept:
            out.delete(MARKER)  # the old merge stops being "complete" before we touch it

        def committed(index: int, entry: dict) -> None:
            if on_shard is not None:
                on_shard(dict(entry, plan=fingerprint))

        report("merging")
        writer = _BackgroundWriter(out, plan, add_written, skip=frozenset(kept), on_commit=committed)
        todo = [t.name for i, shard in enumerate(plan.shards) if i not in kept for t in shard]
        for tp, merged in merged_tensors(inputs, todo, dev, timings, add_read, check_stop):
            writer.put(tp.name, merged)
            state.tensors_done += 1
            report()
        report("finalizing")
        t0 = time.perf_counter()
        writer.finish()
        files = [kept.get(i) or writer.files[i] for i in range(len(plan.shards))]
        if len(plan.shards) > 1:
            data = index_json(plan.shards, writer.names)
            out.write_bytes(INDEX_FILE, data)
            extra_written.append(INDEX_FILE)
            files.append(_file_entry(INDEX_FILE, data))
        for name in inputs.reference.small_files():
            size = inputs.reference.storage.size(name)
            if size > MAX_SMALL_FILE_BYTES:
                plan.warnings.append(f"{name} ({size} bytes) was not copied: larger than {MAX_SMALL_FILE_BYTES} bytes")
                log.warning(plan.warnings[-1])
                continue
            data = inputs.reference.storage.read_bytes(name)
            out.write_bytes(name, data)
            extra_written.append(name)
            files.append(_file_entry(name, data))
        if spec.overwrite:
            _remove_stale_weights(out, {f["name"] for f in files})
        timings["write_s"] = writer.busy_s + time.perf_counter() - t0
        seconds = time.perf_counter() - started
        timings["total_s"] = seconds
        result = MergeResult(output=spec.output, files=files, tensors=len(plan.tensors),
                             bytes_read=state.bytes_read, bytes_written=state.bytes_written,
                             seconds=seconds, timings={k: round(v, 4) for k, v in timings.items()},
                             warnings=list(plan.warnings), device=str(dev),
                             resumed={"shards_kept": len(kept), "tensors_skipped": len(plan.tensors) - len(todo)}
                             if completed_shards is not None else None)
        marker = {"spec": spec.to_dict(), "engine": {"name": "drmerge", "version": __version__},
                  "created_at": created_at, "device": str(dev), "files": files,
                  "tensors": len(plan.tensors), "timings": result.timings, "warnings": result.warnings}
        out.write_bytes(MARKER, json.dumps(marker, indent=2).encode())
        report("done")
        return result
    except BaseException as e:
        if writer is not None:
            try:
                writer.finish()  # aborts the shard in progress
            except BaseException:
                pass
        paused = keep_output_after_failure(e, should_pause, owns_output)
        if paused:  # keep committed shards: a resumed run (maybe already started) uses them
            n_kept = len(kept) + len(writer.written if writer else ())
            if isinstance(e, Interrupted):
                e.kept = n_kept  # the writer may have committed more since it was raised
                raise
            raise Interrupted(f"the merge stopped while a pause was requested ({e}); committed shards kept",
                              kept=n_kept) from e
        left = remove_partial_output(
            out, (writer.written if writer is not None else []) + [k["name"] for k in kept.values()] + extra_written)
        _remove_empty_local_dir(out)
        _raise_failure(e, left)
    finally:
        inputs.close()
        out.close()



def keep_output_after_failure(error: BaseException, should_pause: "CancelFn | None",
                              owns_output: "CancelFn | None") -> bool:
    """Whether a failed run must leave its committed output in place: it was paused (a
    resumed run will use it), or it no longer owns the output (it may be a newer
    attempt's). When ownership cannot be read, keep: deleting might destroy a newer run's."""
    if isinstance(error, Interrupted):
        return True
    if not isinstance(error, Cancelled) and should_pause is not None:
        try:
            if should_pause():
                return True
        except Exception:
            pass
    if owns_output is not None:
        try:
            return not owns_output()
        except Exception:
            return True
    return False

def _file_entry(name: str, data: bytes) -> dict:
    import hashlib

    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _remove_stale_weights(out: Storage, keep: set[str]) -> None:
    """After an overwrite, drop weight files of the previous merge that the new one lacks."""
    for name in out.list_files():
        if name not in keep and (name.startswith("model") and name.endswith(".safetensors") or name == INDEX_FILE
                                 or name.startswith("adapter_")):  # a previous adapter output (adapter_output.py)
            out.delete(name)


def _remove_empty_local_dir(out: Storage) -> None:
    import os

    path = getattr(out, "path", None)
    if path and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)


def validate(spec: MergeSpec, s3_options: dict | None = None) -> dict:
    """Check a spec and its checkpoints' compatibility without merging anything, and say
    what the merge would write: ``files`` (weights first; ``drmerge.json`` comes last and
    is not listed, as in a result), ``tensors`` and ``output_bytes`` (weight files,
    headers included) of the output; for an adapter output, its modules and rank."""
    inputs = Inputs(spec, s3_options)
    try:
        out = open_storage(spec.output, s3_options)
        try:
            _preflight_output(spec, out)
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
                    "output_bytes": ap.weights_bytes, "warnings": plan.warnings}
        kinds = {}
        for tp in plan.tensors:
            kinds[tp.kind] = kinds.get(tp.kind, 0) + 1
        files = shard_names(len(plan.shards)) + ([INDEX_FILE] if len(plan.shards) > 1 else [])
        files += inputs.reference.small_files()
        return {"output_format": "full", "tensors": len(plan.tensors), "kinds": kinds, "shards": len(plan.shards),
                "files": files,
                "output_bytes": sum(len(shard_header(shard)) + sum(t.nbytes for t in shard) for shard in plan.shards),
                "warnings": plan.warnings}
    finally:
        inputs.close()
