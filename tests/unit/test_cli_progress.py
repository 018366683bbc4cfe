"""`drmerge merge`'s progress as a person at an 80-column terminal sees it (a real pty,
a real merge of local checkpoints), and as a log file gets it."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import pytest
import yaml

from tests.support.checkpoints import make_family
from tests.support.terminal import display_width, run_on_pty, screen_lines, segments

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAR = re.compile(r"\d+%\|.*\| \d+/\d+ tensors \[\d\d:\d\d<(\d\d:\d\d|\?), ([\d.]+|\?) tensors/s\]")


@pytest.fixture(scope="module")
def spec_with_a_warning(tmp_path_factory):
    """A DRM merge of ~180 tensors whose plan warns once per model: the base has a tensor
    (ignored by select) that the fine-tunes lack."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("progress")
    f = make_family(str(root), n_models=2, n_layers=60, dim=48)
    tensors = load_file(os.path.join(f["base"], "model.safetensors"))
    tensors["extra.scale"] = torch.ones(4)
    save_file(tensors, os.path.join(f["base"], "model.safetensors"))
    spec = {"base_model": f["base"], "models": [{"model": f["ft-1"]}, {"model": f["ft-2"]}], "method": "drm",
            "select": {"ignore": [r"extra\..*"]}, "output": str(root / "out")}
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path), str(root)


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def test_merge_bar_at_80_columns(spec_with_a_warning):
    path, root = spec_with_a_warning
    rc, stdout, raw = run_on_pty([sys.executable, "-m", "drmerge_ops", "merge", path, "--overwrite"],
                                 columns=80, env=_env(), cwd=root)
    assert rc == 0, raw.decode("utf-8", "replace")
    assert "merged 182 tensors with drm" in stdout
    drawn = segments(raw)
    bars = [s for s in drawn if BAR.search(s)]
    assert len(bars) >= 2, drawn  # drawn at the start and redrawn as it went ...
    redraws = [s for s in drawn if not s.startswith("warning: ")]  # warnings are written once, and may wrap
    assert all(display_width(s) <= 80 for s in redraws), [s for s in redraws if display_width(s) > 80]
    assert not any("0/0" in s for s in drawn), drawn  # ... never before the total is known
    final = bars[-1]
    assert "182/182 tensors" in final and "100%" in final
    assert any(re.search(r"<\d\d:\d\d, [\d.]+ tensors/s", s) for s in bars)  # an ETA and a rate
    # ... and in place: the screen keeps the warnings (whole lines, wrapped at 80) and one bar.
    screen = screen_lines(raw, 80)
    warnings = [f"warning: {f} lacks 1 tensor(s) that are copied from the base anyway (not floating-point, "
                f"or ignored by select): extra.scale" for f in (os.path.join(root, "ft-1"), os.path.join(root, "ft-2"))]
    expected_rows = sum(math.ceil(display_width(w) / 80) for w in warnings) + 1
    assert len(screen) == expected_rows, "\n".join(screen)
    assert screen[-1] == final.rstrip()
    assert not any("warning" in line and "%|" in line for line in screen)
    text = "".join(screen)
    for w in warnings:
        assert w in text.replace("\n", "")  # each warning whole, above the bar, once
    assert text.count("warning: ") == 2


def test_merge_progress_in_a_log_file(spec_with_a_warning):
    path, root = spec_with_a_warning
    r = subprocess.run([sys.executable, "-m", "drmerge_ops", "merge", path, "--overwrite"], env=_env(), cwd=root,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "\r" not in r.stderr and not any("0/0" in line for line in lines), r.stderr
    assert sum(line.startswith("warning: ") for line in lines) == 2
    assert lines[0] == "planning" and lines[-1].startswith("done  182/182 tensors  100%"), lines
    assert len(lines) < 12  # a few lines, not one per tensor
