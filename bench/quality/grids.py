"""Which merges the headline and LoRA regimes run: one table, method row -> validation grid.

Every tunable row gets a grid of exactly ``GRID_SIZE`` parameter sets, so no method wins
by being searched harder; rows without a hyperparameter (``linear``) get one. A row names
the engine method, the parameters it always sets, and the axes whose product is its grid.
A row whose spec the engine refuses (a method not in it yet, or one that takes no LoRA
adapters in the LoRA regime) is skipped by the driver and listed with the engine's
reason, so rows for methods still being written can sit here before the engine has them.

To add a method: one ``Row`` below, with axes whose product has ``GRID_SIZE`` points.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

GRID_SIZE = 8


@dataclass(frozen=True)
class Row:
    label: str
    method: str                                   # drmerge spec ``method``
    fixed: dict = field(default_factory=dict)     # parameters every grid point sets
    axes: dict = field(default_factory=dict)      # name -> values; the grid is their product

    def grid(self) -> list[dict]:
        names = list(self.axes)
        return [{**self.fixed, **dict(zip(names, values))} for values in itertools.product(*self.axes.values())]


SCALES_4 = (0.5, 0.75, 1.0, 1.25)

ROWS: dict[str, Row] = {
    "linear": Row("Linear average", "linear"),
    "task_arithmetic": Row("Task arithmetic", "task_arithmetic",
                           axes={"scale": (0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)}),
    "ties": Row("TIES", "ties", axes={"density": (0.2, 0.5), "scale": SCALES_4}),
    "drm_v": Row("DRM-V", "drm", fixed={"direction": "vertical"},
                 axes={"drop_rate": (0.8, 0.9), "scale": SCALES_4}),
    "drm_h": Row("DRM-H", "drm", fixed={"direction": "horizontal"},
                 axes={"drop_rate": (0.8, 0.9), "scale": SCALES_4}),
}

# The CI smoke: every row, one grid point each (what is checked is the pipeline).
SMOKE_POINTS = {"linear": {}, "task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.5, "scale": 1.0},
                "drm_v": {"direction": "vertical", "drop_rate": 0.8, "scale": 1.0},
                "drm_h": {"direction": "horizontal", "drop_rate": 0.8, "scale": 1.0}}


def grids(rows: dict[str, Row] = ROWS, smoke: bool = False) -> dict[str, list[dict]]:
    if smoke:
        return {name: [SMOKE_POINTS.get(name) or row.grid()[0]] for name, row in rows.items()}
    return {name: row.grid() for name, row in rows.items()}


def check_sizes(rows: dict[str, Row] = ROWS) -> None:
    """Every row with a hyperparameter searches exactly GRID_SIZE points."""
    bad = {n: len(r.grid()) for n, r in rows.items() if r.axes and len(r.grid()) != GRID_SIZE}
    if bad:
        raise ValueError(f"grid sizes differ from GRID_SIZE={GRID_SIZE}: {bad}")


check_sizes()
