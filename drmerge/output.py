"""One output transaction: everything a run writes to its output, and the rules around it,
for both full output (pipeline.run_merge) and adapter output (adapter_output.py).

In order (docs/DESIGN.md, "The output transaction"):

1. ``start``: a resumed run whose output is already complete for this very spec gets
   that result back; otherwise the output must hold no merge (``output_exists``) unless
   ``overwrite``.
2. ``resume``: a resumed run aborts the uploads a killed run left and keeps the recorded
   shards that are still exactly what it would write (same plan fingerprint, size and
   sha256 read back in full).
3. ``begin``: with ``overwrite``, the old marker is deleted before anything is touched, so
   the old merge stops being "complete" first.
4. ``committed`` / ``write`` / ``copy_small_files``: the ledger of every object this run
   committed; shards (and what an abandoned run's cleanup must know of) are reported
   through ``on_shard`` with the plan fingerprint, the service's resume journal.
5. ``finish``: after an overwrite the previous merge's weight files that this one lacks
   are removed, then ``drmerge.json``, the completeness marker, is written last.
6. ``fail``: a failed run removes what it committed (and its kept shards), unless it was
   paused or no longer owns the output (then everything stays, ``Interrupted``). A cleanup
   that fails too never masks the run's error: the error carries ``cleanup_pending``,
   what may remain, for ``discard_partial_output`` to remove later (the service retries).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Callable

from .checkpoint import INDEX_FILE, MAX_SMALL_FILE_BYTES, shard_header
from .errors import Cancelled, Interrupted, MergeError, StopPoll
from .result import CancelFn, MergeResult, adapter_summary, decisions_summary
from .spec import MergeSpec
from .storage import Storage, open_storage
from .version import __version__

log = logging.getLogger(__name__)

MARKER = "drmerge.json"
VERIFY_CHUNK = 16 * 1024 * 1024  # read-back size when verifying a kept shard


class OutputTransaction:
    """One run's writes to ``spec.output``; see the module docstring for the steps.

    ``completed_shards`` (a list, even empty) makes this a resumed run: the journal of an
    earlier run's ``on_shard`` reports. ``resumable``: the run's committed shards are worth
    keeping for a later run (full output). An adapter output is one small file written at
    the end: a pause keeps nothing, and a resumed run only recognises an output that is
    already complete."""

    def __init__(self, spec: MergeSpec, s3_options: dict | None = None, *, completed_shards: list[dict] | None = None,
                 on_shard: Callable[[dict], None] | None = None, should_pause: CancelFn | None = None,
                 owns_output: CancelFn | None = None, resumable: bool = True):
        self.spec = spec
        self.out = open_storage(spec.output, s3_options)
        self.completed = completed_shards
        self.resuming = completed_shards is not None
        self.on_shard, self.should_pause, self.owns_output = on_shard, should_pause, owns_output
        self.resumable = resumable
        self.fingerprint: str | None = None
        self.kept: dict[int, dict] = {}  # shard index -> {name, size, sha256}, from an earlier run
        self.shards: list[str] = []  # shards this run committed
        self.others: list[str] = []  # the other objects it committed (index, configs, small files)

    # ------------------------------------------------------------------ before writing

    def start(self, device) -> MergeResult | None:
        """A resumed run's result if its output is already complete for this spec, else
        None after checking that the output is free (or ``overwrite``)."""
        if self.resuming:
            done = self._finished(device)
            if done is not None:
                return done
        preflight(self.spec, self.out)
        return None

    def resume(self, fingerprint: str, plan=None, names: list[str] | None = None, warnings: list[str] | None = None,
               poll: Callable[[], None] | None = None) -> dict[int, dict]:
        """Record the plan fingerprint; for a resumed run, abort unfinished uploads and,
        given a ``plan`` and its shard ``names``, keep the recorded shards that verify."""
        self.fingerprint = fingerprint
        if self.resuming:
            dropped = self.out.abort_stale_writes()
            if dropped:
                log.info("aborted %d unfinished upload(s) left in %s by an earlier run", dropped, self.out.uri)
            if plan is not None:
                self.kept = self._kept_shards(plan, names, warnings if warnings is not None else [], poll)
        return self.kept

    def begin(self) -> None:
        """The old merge stops being "complete" before anything of it is touched."""
        if self.spec.overwrite and not self.kept:
            self.out.delete(MARKER)

    # ------------------------------------------------------------------ the ledger

    def committed(self, entry: dict, shard: bool = True, report: bool = True, extra: dict | None = None) -> None:
        """An object this run committed (``{name, size, sha256}``): in the ledger, and
        reported through ``on_shard`` (with the plan fingerprint and ``extra``, e.g. the
        shard's per-matrix decisions, which a resumed run reads back) if ``report``."""
        (self.shards if shard else self.others).append(entry["name"])
        if report and self.on_shard is not None:
            self.on_shard(dict(entry, plan=self.fingerprint, **(extra or {})))

    def kept_entries(self) -> dict[int, dict]:
        """The journal entries of the shards ``resume`` kept (shard index -> entry as
        recorded, with whatever ``extra`` it carried)."""
        by_name = {e.get("name"): e for e in self.completed or [] if isinstance(e, dict)}
        return {i: by_name.get(k["name"], {}) for i, k in self.kept.items()}

    def write(self, name: str, data: bytes, report: bool = False) -> dict:
        """Write a small object whole; returns its file entry."""
        self.out.write_bytes(name, data)
        entry = file_entry(name, data)
        self.committed(entry, shard=False, report=report)
        return entry

    def copy_small_files(self, reference, warnings: list[str]) -> list[dict]:
        """The reference checkpoint's config and tokenizer files, copied as they are (one
        larger than MAX_SMALL_FILE_BYTES is skipped with a warning)."""
        entries = []
        for name in reference.small_files():
            size = reference.storage.size(name)
            if size > MAX_SMALL_FILE_BYTES:
                warnings.append(f"{name} ({size} bytes) was not copied: larger than {MAX_SMALL_FILE_BYTES} bytes")
                log.warning(warnings[-1])
                continue
            entries.append(self.write(name, reference.storage.read_bytes(name)))
        return entries

    # ------------------------------------------------------------------ the end

    def finish(self, result: MergeResult, created_at: str, extra: dict | None = None) -> MergeResult:
        """Stale files of an overwritten merge removed, then the marker, written last."""
        if self.spec.overwrite:
            _remove_stale_weights(self.out, {f["name"] for f in result.files})
        marker = {"spec": self.spec.to_dict(), "engine": {"name": "drmerge", "version": __version__},
                  "created_at": created_at, "device": result.device, "files": result.files,
                  "tensors": result.tensors, **(extra or {}), "timings": result.timings, "warnings": result.warnings}
        self.out.write_bytes(MARKER, json.dumps(marker, indent=2).encode())
        return result

    def fail(self, error: BaseException):
        """A failed run's ending (call inside ``except``; always raises). Paused or no
        longer the owner: everything stays and ``Interrupted`` is raised. Else what this
        run committed and kept is removed, and the error is raised carrying what the
        cleanup could not remove (``cleanup_pending``); anything but a MergeError becomes
        ``internal_error``."""
        if keep_output_after_failure(error, self.should_pause, self.owns_output):
            _remove_empty_local_dir(self.out)
            if self.resumable:  # a resumed run (maybe already started) uses the committed shards
                n_kept = len(self.kept) + len(self.shards)
                if isinstance(error, Interrupted):
                    error.kept = n_kept  # more may have been committed since it was raised
                    raise error
                raise Interrupted(f"the merge stopped while a pause was requested ({error}); committed shards kept",
                                  kept=n_kept) from error
            if isinstance(error, Interrupted):
                raise error
            raise Interrupted(f"the merge stopped while a pause was requested ({error})", kept=0) from error
        left = remove_partial_output(self.out, self.shards + [k["name"] for k in self.kept.values()] + self.others)
        _remove_empty_local_dir(self.out)
        _raise_failure(error, left)

    def close(self) -> None:
        self.out.close()

    # ------------------------------------------------------------------ verification

    def _finished(self, device) -> MergeResult | None:
        """A resumed run whose predecessor got as far as ``drmerge.json`` (and died before
        anyone heard of it): if that marker is for this very spec and every file it lists
        verifies, the merge is done."""
        out = self.out
        try:
            if not out.exists(MARKER) or out.size(MARKER) > MAX_SMALL_FILE_BYTES:
                return None
            marker = json.loads(out.read_bytes(MARKER))
        except (MergeError, ValueError, UnicodeDecodeError):
            return None
        if not isinstance(marker, dict) or marker.get("spec") != json.loads(json.dumps(self.spec.to_dict())):
            return None
        files = marker.get("files") or []
        for f in files:
            if not isinstance(f, dict) or _verified(out, str(f.get("name")), f.get("size"), str(f.get("sha256"))):
                return None
        timings = marker.get("timings") or {}
        return MergeResult(output=self.spec.output, files=files, tensors=int(marker.get("tensors") or 0),
                           bytes_read=0, bytes_written=0, seconds=float(timings.get("total_s") or 0.0),
                           timings=timings, warnings=list(marker.get("warnings") or []),
                           device=str(marker.get("device") or device),
                           resumed={"shards_kept": len(files), "tensors_skipped": int(marker.get("tensors") or 0)},
                           adapter=adapter_summary(marker.get("adapter")),
                           decisions=_summary(marker.get("decisions")))

    def _kept_shards(self, plan, names: list[str], warnings: list[str], poll) -> dict[int, dict]:
        """The recorded shards that are still exactly what this run would write: shard index
        -> {name, size, sha256}. Each is read back in full (size and sha256), ``poll``
        (cancel, time limit) asked between them."""
        poll = poll or StopPoll()
        by_name = {e.get("name"): e for e in self.completed or [] if isinstance(e, dict)}
        kept: dict[int, dict] = {}
        for i, (name, shard) in enumerate(zip(names, plan.shards)):
            poll()
            entry = by_name.get(name)
            if entry is None:
                continue
            if entry.get("plan") != self.fingerprint:
                warnings.append(f"{name}: recorded by a run with other inputs or settings; rewriting it")
                continue
            size = len(shard_header(shard)) + sum(t.nbytes for t in shard)
            if entry.get("size") != size:
                warnings.append(f"{name}: recorded size {entry.get('size')} does not match the plan's {size}; "
                                "rewriting it")
                continue
            why = _verified(self.out, name, size, str(entry.get("sha256")))
            if why:
                warnings.append(f"{name} did not verify ({why}); rewriting it")
                continue
            kept[i] = {"name": name, "size": size, "sha256": entry["sha256"]}
        return kept


def _summary(decisions) -> dict | None:
    try:
        return decisions_summary(decisions) if isinstance(decisions, dict) else None
    except (AttributeError, KeyError, TypeError):  # not what this engine writes
        return None


def preflight(spec: MergeSpec, out: Storage) -> None:
    """The output must hold no merge, unless ``overwrite``."""
    if out.exists(MARKER) and not spec.overwrite:
        raise MergeError("output_exists", f"{out.uri} already holds a merge ({MARKER}); "
                         "choose another output or set overwrite", param="output")


def file_entry(name: str, data: bytes) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


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


def keep_output_after_failure(error: BaseException, should_pause: CancelFn | None,
                              owns_output: CancelFn | None) -> bool:
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


def _remove_stale_weights(out: Storage, keep: set[str]) -> None:
    """After an overwrite, drop weight files of the previous merge that the new one lacks."""
    for name in out.list_files():
        if name not in keep and (name.startswith("model") and name.endswith(".safetensors") or name == INDEX_FILE
                                 or name.startswith("adapter_")):  # a previous adapter output
            out.delete(name)


def _remove_empty_local_dir(out: Storage) -> None:
    path = getattr(out, "path", None)
    if path and os.path.isdir(path) and not os.listdir(path):
        os.rmdir(path)
