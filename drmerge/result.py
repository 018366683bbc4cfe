"""What a run reports: its progress while it runs (``Progress``, handed to the progress
hook) and what it wrote (``MergeResult``, returned; the CLI's ``--json`` summary and the
job's result in the service)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable


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
    decisions: dict | None = None  # what the method decided per matrix, counted (per matrix: drmerge.json)

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def adapter_summary(adapter: dict | None) -> dict | None:
    """The part of drmerge.json's ``adapter`` record a result carries (not every module)."""
    if not isinstance(adapter, dict):
        return None
    return {"rank": adapter.get("rank"), "energy_kept": adapter.get("energy_kept")}


def decisions_summary(decisions: dict) -> dict | None:
    """How often each value was decided (``{"direction": {"vertical": 10, "horizontal": 4}}``)
    over drmerge.json's per-tensor ``decisions`` (a split matrix counts once per part)."""
    counts: dict[str, dict[str, int]] = {}
    for record in decisions.values():
        for decided in (record["parts"].values() if "parts" in record else [record]):
            for key, value in decided.items():
                slot = counts.setdefault(key, {})
                slot[str(value)] = slot.get(str(value), 0) + 1
    return counts or None
