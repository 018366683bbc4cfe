"""Aliases of one location through the real CLI (issue 18, items 1 and 16): the engine
refuses an output that is, contains or lies inside an input, whatever its spelling
(through the service: tests/e2e/test_location_aliases.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------ (d) the CLI


def drmerge_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "drmerge", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def write(path, spec: dict) -> str:
    path.write_text(json.dumps(spec))
    return str(path)


def test_the_cli_refuses_the_aliases_too(tmp_path):
    from drmerge.cli import main
    from tests.support.checkpoints import make_family

    local = make_family(str(tmp_path / "ckpt"), n_models=2)
    victim = local["ft-1"]
    before = {n: open(os.path.join(victim, n), "rb").read() for n in os.listdir(victim)}
    os.symlink(victim, tmp_path / "alias")
    s3 = {"base_model": "s3://shared/alpha/base/", "models": ["s3://shared/alpha/victim-in/", "s3://shared/alpha/b/"],
          "output": "s3://shared//alpha/victim-in/", "overwrite": True}
    # the report's request, through the real entry point: refused before any S3 access
    res = drmerge_cli("validate", write(tmp_path / "s3.json", s3))
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: invalid_spec: output: s3://shared/alpha/victim-in/ ")
    assert "is the input models[0].model s3://shared/alpha/victim-in/" in last
    res = drmerge_cli("validate", write(tmp_path / "dots.json", dict(s3, output="s3://shared/alpha/x/../out/")))
    assert res.returncode == 1 and "'..' segment" in res.stderr
    spec = {"base_model": local["base"], "models": [victim, local["ft-2"]], "overwrite": True}
    for output, how in [(str(tmp_path / "alias"), "is"), (str(tmp_path / "alias" / "merged"), "lies inside"),
                        (str(tmp_path / "ckpt"), "contains"), ("alias", "is")]:  # relative: to the spec file
        for command in ("validate", "merge"):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main([command, write(tmp_path / "local.json", dict(spec, output=output)), "--json"])
            error = json.loads(out.getvalue())["error"]
            assert code == 1 and (error["code"], error["param"]) == ("invalid_spec", "output"), (command, output)
            named = os.path.realpath(local["base"] if how == "contains" else victim)
            assert f" {how} the input " in error["message"] and named in error["message"], error
    assert {n: open(os.path.join(victim, n), "rb").read() for n in os.listdir(victim)} == before
