"""The job store's Lua scripts: every script names its KEYS and ARGV, the names reach
the script as K.<name>/A.<name>, and a call with a missing or unexpected name fails in
Python before anything reaches Redis (no servers needed)."""

from __future__ import annotations

import pytest
import redis

from service.jobs import scripts
from service.jobs.status import STATUSES, TERMINAL

NAMES = sorted(p.stem for p in scripts.SCRIPT_DIR.glob("*.lua"))


@pytest.mark.parametrize("name", NAMES)
def test_every_script_names_its_keys_and_args(name):
    keys, args, source = scripts.load(name)
    assert keys, f"{name}.lua names no KEYS"
    body = source.split("\n", 4)[4]  # after the prelude
    for n in keys:
        used = f"K.{n}" in body or (n.startswith("index_") and "K['index_' .." in body)  # by status
        assert used, f"{name}.lua never uses KEYS name {n}"
    for n in args:
        assert f"A.{n}" in body, f"{name}.lua never uses ARGV name {n}"
    assert "KEYS[" not in body and "ARGV[" not in body, f"{name}.lua indexes KEYS/ARGV by position"


def test_transition_has_an_index_key_per_status_and_the_terminal_set():
    keys, _, source = scripts.load("transition")
    assert [k for k in keys if k.startswith("index_")] == [f"index_{s}" for s in STATUSES]
    assert "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL)) + "}" in source


def test_a_call_with_a_wrong_name_fails_before_redis():
    client = redis.Redis(host="127.0.0.1", port=1)  # never contacted
    script = scripts.Script(client, "job_heartbeat")
    with pytest.raises(TypeError, match=r"ARGV: missing \['attempt'\], unexpected \['atempt'\]"):
        script(keys={"job": "x"}, args={"atempt": "1"})
    with pytest.raises(TypeError, match=r"KEYS: missing \['job'\]"):
        script(keys={}, args={"attempt": "1"})
