"""Safetensors checkpoints: validated header parsing, ranged tensor reads, sharded writes.

We parse the safetensors header ourselves (it is 8 bytes of length + JSON) rather than
memory-mapping files: it works the same over S3 ranged reads, and every way a file can
be malformed becomes a ``corrupt_checkpoint`` error naming the file, instead of a crash.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from enum import StrEnum

import torch

from .errors import MergeError, StopPoll
from .storage import ObjectWriter, Storage

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024
# A checkpoint's size in tensors, and its index file's in bytes, bound planning time and
# memory (an index is read whole: a 1 GiB one took a worker from 0.5 to 2.5 GB). The
# largest published checkpoints have ~92,000 tensors (DeepSeek-V3, with its FP8 scales)
# and an index of ~9 MB; these limits leave about three times that.
MAX_TENSORS = 262_144
MAX_INDEX_BYTES = 32 * 1024 * 1024

# safetensors dtype code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}
if hasattr(torch, "float8_e4m3fn"):
    DTYPES["F8_E4M3"] = (torch.float8_e4m3fn, 1)
    DTYPES["F8_E5M2"] = (torch.float8_e5m2, 1)
FLOAT_CODES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
CODE_OF = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_CODE = {v[0]: k for k, v in DTYPES.items()}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


class Source(StrEnum):
    """How one input holds one tensor of the plan (``source(name)`` of a reader)."""

    FULL = "full"  # a full checkpoint's weights: the task delta is W_t - W0
    FACTORED = "factored"  # LoRA factors: the task delta is scaling * B_t @ A_t
    LAYER = "layer"  # an adapter's own copy of the layer plus its LoRA delta: full weights
    ABSENT = "absent"  # the input leaves the tensor alone: a zero delta


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    file: str
    start: int  # absolute byte offset in ``file``
    length: int

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _corrupt(storage: Storage, file: str, what: str):
    raise MergeError("corrupt_checkpoint", f"{storage.describe(file)}: {what}")


def parse_header(storage: Storage, file: str, poll=None) -> dict[str, TensorInfo]:
    """Read and validate one safetensors file's header; never trusts a length or offset.
    ``poll`` (cancel, time limit) is asked as the entries are checked."""
    poll = poll or StopPoll()
    size = storage.size(file)
    if size < 8:
        _corrupt(storage, file, f"file is {size} bytes, too short to hold a safetensors header")
    (hlen,) = struct.unpack("<Q", bytes(storage.read_range(file, 0, 8)))
    if hlen > MAX_HEADER_BYTES:
        _corrupt(storage, file, f"header length {hlen} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if hlen > size - 8:
        _corrupt(storage, file, f"header length {hlen} is larger than the file ({size} bytes)")
    try:
        header = json.loads(bytes(storage.read_range(file, 8, hlen)).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        _corrupt(storage, file, f"header is not valid JSON ({e.__class__.__name__}: {e})")
    if not isinstance(header, dict):
        _corrupt(storage, file, "header is not a JSON object")
    if len(header) - ("__metadata__" in header) > MAX_TENSORS:
        _corrupt(storage, file, f"header lists {len(header) - ('__metadata__' in header)} tensors, more than a "
                 f"checkpoint may hold ({MAX_TENSORS})")
    data_start = 8 + hlen
    data_len = size - data_start
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        poll()
        if name == "__metadata__":
            continue
        if not _is_text(name):
            _corrupt(storage, file, f"tensor name {name!r} is not valid Unicode (a lone surrogate escape)")
        if not isinstance(entry, dict) or set(entry) - {"dtype", "shape", "data_offsets"} or len(entry) != 3:
            _corrupt(storage, file, f"tensor {name!r} has a malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            _corrupt(storage, file, f"tensor {name!r} has unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**53 for x in shape)):
            _corrupt(storage, file, f"tensor {name!r} has a malformed shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in offsets)):
            _corrupt(storage, file, f"tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = math.prod(shape) * DTYPES[dtype][1]  # Python ints: no overflow
        if not 0 <= begin <= end <= data_len:
            _corrupt(storage, file, f"tensor {name!r} data_offsets {offsets} fall outside the {data_len}-byte data section")
        if end - begin != nbytes:
            _corrupt(storage, file, f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, offsets give {end - begin}")
        infos[name] = TensorInfo(name, dtype, tuple(shape), file, data_start + begin, nbytes)
    spans = sorted((i.start, i.start + i.length, i.name) for i in infos.values() if i.length)
    for (_, e1, n1), (b2, _, n2) in zip(spans, spans[1:]):
        if b2 < e1:
            _corrupt(storage, file, f"tensors {n1!r} and {n2!r} overlap")
    return infos


def _is_text(name: str) -> bool:
    """JSON may escape lone surrogates (``"\\ud800"``), which no UTF-8 file, S3 key or
    HTTP response can carry (the safetensors library refuses them too)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _safe_shard_name(storage: Storage, index_file: str, name) -> str:
    if (not isinstance(name, str) or not name.endswith(".safetensors") or "/" in name or "\\" in name
            or name.startswith(".") or "\x00" in name or not _is_text(name)):
        _corrupt(storage, index_file, f"weight_map points to {name!r}, which is not a shard file inside the checkpoint")
    return name


class CheckpointReader:
    """Tensor directory of one checkpoint (single file or sharded); reads one tensor at a time."""

    is_adapter = False

    def __init__(self, storage: Storage, poll=None):
        self.storage = storage
        self.poll = poll or StopPoll()  # cancel and time limit, asked while the headers are read
        try:
            files = set(storage.list_files())
        except MergeError:
            raise
        if not files:
            raise MergeError("input_not_found", f"{storage.uri} does not exist or is empty")
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        if INDEX_FILE in files:
            self._read_index(files)
        elif SINGLE_FILE in files:
            self.tensors = parse_header(storage, SINGLE_FILE, self.poll)
        else:
            others = sorted(f for f in files if f.endswith(".safetensors"))
            if len(others) == 1:
                self.tensors = parse_header(storage, others[0], self.poll)
            else:
                found = ", ".join(sorted(files)[:8])
                raise MergeError(
                    "input_not_found",
                    f"{storage.uri} holds no {SINGLE_FILE} or {INDEX_FILE} (found: {found}); "
                    "only safetensors checkpoints are supported",
                )

    def _read_index(self, files: set[str]) -> None:
        size = self.storage.size(INDEX_FILE)
        if size > MAX_INDEX_BYTES:
            _corrupt(self.storage, INDEX_FILE, f"is {size} bytes, more than an index may be ({MAX_INDEX_BYTES})")
        try:
            index = json.loads(bytes(self.storage.read_range(INDEX_FILE, 0, size)))  # the size checked
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
            _corrupt(self.storage, INDEX_FILE, "is not a JSON object with a 'weight_map' mapping")
        if len(weight_map) > MAX_TENSORS:
            _corrupt(self.storage, INDEX_FILE, f"lists {len(weight_map)} tensors, more than a checkpoint may hold "
                     f"({MAX_TENSORS})")
        shards = {}
        for tensor, shard in weight_map.items():
            shards.setdefault(_safe_shard_name(self.storage, INDEX_FILE, shard), []).append(tensor)
        for shard, names in sorted(shards.items()):
            self.poll()
            if shard not in files:
                _corrupt(self.storage, INDEX_FILE, f"points to shard {shard}, which does not exist")
            infos = parse_header(self.storage, shard, self.poll)
            for name in names:
                if name not in infos:
                    _corrupt(self.storage, INDEX_FILE, f"says {name!r} is in {shard}, but that shard does not hold it")
                self.tensors[name] = infos[name]

    def names(self) -> list[str]:
        return list(self.tensors)

    def source(self, name: str) -> Source:
        return Source.FULL if name in self.tensors else Source.ABSENT

    def nbytes(self, name: str) -> int:
        return self.tensors[name].length

    def read(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        buf = self.storage.read_range(info.file, info.start, info.length)
        dtype = DTYPES[info.dtype][0]
        if info.length == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)

    def read_elements(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Flat elements ``[start, stop)`` of a tensor: one ranged read, nothing else."""
        info = self.tensors[name]
        dtype, size = DTYPES[info.dtype]
        if stop <= start:
            return torch.empty(0, dtype=dtype)
        buf = self.storage.read_range(info.file, info.start + start * size, (stop - start) * size)
        return torch.frombuffer(buf, dtype=dtype)

    def small_files(self) -> list[str]:
        """Non-weight files worth copying next to merged weights (config, tokenizer, ...)."""
        return sorted(
            f for f in self.files
            if not f.endswith(WEIGHT_SUFFIXES) and f not in (INDEX_FILE, "drmerge.json")
            and not f.startswith(".") and not f.startswith("adapter_")
        )


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


def plan_shards(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most ``shard_size`` bytes (a larger
    tensor gets a shard of its own). Known before merging, so each shard's header can
    be written first and its tensors streamed after it."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count <= 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def shard_header(tensors: list[OutTensor], metadata: dict | None = None) -> bytes:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as safetensors does
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """Streams one shard: header first, then each tensor as it is produced, hashing as it goes."""

    def __init__(self, storage: Storage, name: str, tensors: list[OutTensor]):
        self.name = name
        self.expected = list(tensors)
        self.sha = hashlib.sha256()
        self.size = 0
        self._writer: ObjectWriter = storage.open_writer(name)
        self._write(shard_header(tensors))

    def _write(self, data) -> None:
        self.sha.update(data)
        self._writer.write(data)
        self.size += len(data)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected.pop(0)
        if want.name != name or tuple(tensor.shape) != want.shape or TORCH_CODE[tensor.dtype] != want.dtype:
            raise MergeError("internal_error", f"shard {self.name} expected {want}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self._write(tensor_bytes(tensor))

    @property
    def full(self) -> bool:
        return not self.expected

    def commit(self) -> dict:
        self._writer.commit()
        return {"name": self.name, "size": self.size, "sha256": self.sha.hexdigest()}

    def abort(self) -> None:
        self._writer.abort()


def index_json(shards: list[list[OutTensor]], names: list[str]) -> bytes:
    weight_map = {t.name: file for file, ts in zip(names, shards) for t in ts}
    total = sum(t.nbytes for ts in shards for t in ts)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
