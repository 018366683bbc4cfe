"""A merge's inputs: open readers for the base (if any) and every model (full checkpoints
or LoRA adapters, local or S3), and the plan over them (plan.py), made once.

Nothing is read but headers until the executor asks for a tensor (``read``, ``lazy``,
``read_copied``): a merge streams its inputs one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import torch

from .adapters import AdapterReader, is_adapter_dir, plan_with_adapters
from .checkpoint import DTYPES, CheckpointReader
from .errors import MergeError, StopPoll
from .methods.base import Op
from .plan import Plan, build_plan
from .spec import MergeSpec
from .storage import Storage, open_storage


class Inputs:
    """Open readers for the base (if any) and every model, with the plan over them."""

    def __init__(self, spec: MergeSpec, s3_options: dict | None = None,
                 should_stop: Callable[[], bool] | None = None):
        """``should_stop`` is the run's cancel hook (the service's also says when the time
        limit is up): planning asks it between reads and while it loops over tensors and
        patterns (errors.StopPoll), so a cancel or a deadline takes effect before merging."""
        self.spec = spec
        self.method = spec.merge_method
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
                self.reference = self.base or self.models[0]
                self.plan: Plan = build_plan(spec, self.reference, self.base, self.models, uris, self.poll)
        except BaseException:
            self.close()
            raise
        self._copied = {t.name for t in self.plan.tensors if t.op == Op.COPY}

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

    def read(self, name: str) -> tuple[torch.Tensor | None, list]:
        """The base's tensor and every model's (a tensor, LoRA factors, or None: see
        AdapterReader.read)."""
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
        return sum(r.nbytes(name) for r in ([self.base] if self.base else []) + self.models)

    def fingerprint(self) -> str:
        """What a kept shard's bytes depend on: the spec (less ``overwrite``), the plan and
        where every input tensor lives. A journal entry from another fingerprint is ignored
        (output.OutputTransaction.resume)."""
        h = hashlib.sha256()
        s = self.spec.to_dict()
        s.pop("overwrite", None)
        h.update(json.dumps(s, sort_keys=True).encode())
        for tp in self.plan.tensors:
            view = tp.view.to_dict() if tp.view is not None else None  # from config.json too: not in the spec
            h.update(json.dumps([tp.name, tp.kind, tp.out.dtype, list(tp.out.shape), view, tp.pool]).encode())
        h.update(json.dumps([[t.name for t in shard] for shard in self.plan.shards]).encode())
        for reader in ([self.base] if self.base else []) + self.models:
            for name, info in sorted(getattr(reader, "tensors", {}).items()):
                self.poll()
                h.update(json.dumps([name, info.file, info.start, info.length, info.dtype]).encode())
            if isinstance(reader, AdapterReader):  # its factors' locations and its config (scaling)
                h.update(reader.fingerprint().encode())
        return h.hexdigest()

    def close(self) -> None:
        for s in self.storages:
            s.close()


class LazyTensor:
    """A tensor left in storage, read range by range while it is merged element-wise.

    Large tensors (embeddings, output heads) are merged this way so that their inputs are
    never all in memory at once: memory per tensor is a few chunks, whatever the vocabulary.
    Offers the slice of the tensor API that ``kernels.elementwise.merge_elementwise`` uses
    on flat inputs.
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
