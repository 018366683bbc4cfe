"""The job store's Lua scripts: ``scripts/<name>.lua``, loaded by name, called with named
KEYS and ARGV.

Each script starts with a comment block that names its KEYS and ARGV in order, one per
line (the name three spaces after ``--``; continuation text indented deeper)::

    -- KEYS
    --   job                the job hash
    -- ARGV
    --   attempt            the attempt stamping it

Loading puts a prelude before the script body, so the body reads ``K.job`` and
``A.attempt`` instead of ``KEYS[1]`` and ``ARGV[1]``, plus the status sets it tests
(``TERMINAL[s]``, ``OWNED[s]``), generated from service.jobs.status: the one definition.
A call passes two dicts; a missing or unexpected name is a TypeError before anything
reaches Redis, so a script and its caller cannot drift apart by position.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from .status import OWNED, TERMINAL

SCRIPT_DIR = Path(__file__).with_name("scripts")
_SECTION = re.compile(r"^--\s*(KEYS|ARGV)\s*$")
_ENTRY = re.compile(r"^-- {3}([a-z_][a-z0-9_]*)(?:\s|$)")  # a name at column 6; deeper: continued text


@lru_cache(maxsize=None)
def load(name: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """``(key names, arg names, source with its prelude)`` of ``scripts/<name>.lua``."""
    text = (SCRIPT_DIR / f"{name}.lua").read_text(encoding="utf-8")
    names: dict[str, list[str]] = {"KEYS": [], "ARGV": []}
    section = None
    for line in text.splitlines():
        if not line.startswith("--"):
            break  # the header ends at the first line of code
        if m := _SECTION.match(line):
            section = m.group(1)
        elif section and (m := _ENTRY.match(line)):
            names[section].append(m.group(1))
    for section, found in names.items():
        if len(set(found)) != len(found):
            raise ValueError(f"{name}.lua: a {section} name appears twice: {found}")
    prelude = [
        "local K = {" + ", ".join(f"{n} = KEYS[{i}]" for i, n in enumerate(names["KEYS"], 1)) + "}",
        "local A = {" + ", ".join(f"{n} = ARGV[{i}]" for i, n in enumerate(names["ARGV"], 1)) + "}",
        _lua_set("TERMINAL", TERMINAL),
        _lua_set("OWNED", OWNED),
    ]
    return tuple(names["KEYS"]), tuple(names["ARGV"]), "\n".join(prelude) + "\n" + text


def _lua_set(name: str, members) -> str:
    return f"local {name} = {{" + ", ".join(f"{m} = true" for m in sorted(members)) + "}"


class Script:
    """One loaded script on one Redis client: ``script(keys={...}, args={...})``."""

    def __init__(self, client, name: str):
        self.name = name
        self.key_names, self.arg_names, source = load(name)
        self._script = client.register_script(source)

    def __call__(self, *, keys: dict, args: dict):
        for what, given, expected in (("KEYS", keys, self.key_names), ("ARGV", args, self.arg_names)):
            if set(given) != set(expected):
                missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
                raise TypeError(f"{self.name}.lua {what}: missing {missing}, unexpected {extra}")
        return self._script(keys=[keys[n] for n in self.key_names], args=[args[n] for n in self.arg_names])
