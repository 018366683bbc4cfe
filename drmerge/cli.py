"""The engine's commands: ``drmerge merge`` and ``drmerge validate`` (also ``python -m drmerge``).

The ``drmerge`` console script is ``drmerge_ops.cli``, which adds the service, dev-stack,
key-admin and client commands to these two; the engine itself knows nothing of them.

Scripts rely on this contract: exit 0 on success; on failure a non-zero exit and a last
stderr line ``error: <code>: <message>``; with ``--json`` one JSON object on stdout
(the summary, or ``{"error": {...}}``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import MergeError

EXIT_ERROR = 1
EXIT_USAGE = 2


class ProgressBar:
    """A one-line progress bar on stderr (redrawn in place on a terminal, sparse lines otherwise)."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.tty = stream.isatty()
        self.started = time.monotonic()
        self.last = 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        final = p.stage == "done"
        if not final and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        frac = p.tensors_done / p.tensors_total if p.tensors_total else 0.0
        filled = int(frac * self.width)
        line = (f"{p.stage:<10} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{p.tensors_done}/{p.tensors_total} tensors  {p.bytes_read / 1e6:,.0f} MB read  "
                f"{p.bytes_written / 1e6:,.0f} MB written  {now - self.started:,.1f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _load(path: str, overwrite: bool = False):
    from .spec import load_spec_file

    spec = load_spec_file(path)
    return spec.with_overrides(overwrite=True) if overwrite else spec


def cmd_merge(args) -> int:
    from .pipeline import run_merge

    spec = _load(args.spec, args.overwrite)
    result = run_merge(spec, device=args.device, progress=None if args.json else ProgressBar())
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        for w in result.warnings:
            print(f"warning: {w}", file=sys.stderr)
        print(f"merged {result.tensors} tensors with {spec.method} on {result.device} in {result.seconds:.1f}s")
        print(f"  read {result.bytes_read / 1e6:,.1f} MB, wrote {result.bytes_written / 1e6:,.1f} MB "
              f"in {len(result.files)} files")
        if result.adapter:
            print(f"  adapter: rank {result.adapter['rank']}, {100 * result.adapter['energy_kept']:.2f}% of the "
                  "merged deltas' energy kept")
        print(f"  output: {result.output}")
    return 0


def cmd_validate(args) -> int:
    from .pipeline import validate

    spec = _load(args.spec, args.overwrite)
    report = validate(spec)
    if args.json:
        print(json.dumps({"valid": True, **report}))
    else:
        for w in report["warnings"]:
            print(f"warning: {w}", file=sys.stderr)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(report["kinds"].items()))
        if report["output_format"] == "adapter":
            print(f"valid: a rank-{report['adapter_rank']} LoRA adapter of {report['modules']} modules ({kinds}), "
                  f"{report['tensors']} tensors, {_size(report['output_bytes'])} out")
        else:
            print(f"valid: {report['tensors']} tensors ({kinds}), {report['shards']} output shard(s), "
                  f"{_size(report['output_bytes'])} out")
        print(f"  files: {', '.join(report['files'])}")
        for line in structure_lines(report):
            print(f"  {line}")
    return 0


def _names(names: list[str], limit: int = 3) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({', '.join(names[:limit])}{more})"


def structure_lines(report: dict) -> list[str]:
    """``drmerge validate``'s lines on splits, orientation, exclusions, statistics, pooled
    trims and what is decided at merge time (pipeline.structure)."""
    lines = []
    for rule, entry in report.get("splits", {}).items():
        lines.append(f"split by {rule} into {entry['parts']}: {_names(entry['tensors'])}")
    if report.get("transposed"):
        lines.append(f"transposed (stored in x out, merged as the linear map out x in): {_names(report['transposed'])}")
    for pattern, names in report.get("excluded", {}).items():
        lines.append(f"excluded from the matrices by {pattern!r} (merged as vector-like): {_names(names)}")
    if report.get("statistics"):
        lines.append(f"statistics (the weighted mean of the models' values): {_names(report['statistics'])}")
    for kind, pool in report.get("pools", {}).items():
        lines.append(f"one trim over all {pool['tensors']} {kind} tensors together, keeping {pool['keep']:g} of "
                     "each model's entries")
    for name, entry in report.get("decided", {}).items():
        lines.append(f"{name}: {entry['how']} ({entry['matrices']} matrices and parts)")
    return lines


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{n / 1e3:,.1f} kB"


def register(sub) -> None:
    """Add the engine's subcommands to an argparse ``add_subparsers`` object."""
    p = sub.add_parser("merge", help="run a merge described by a YAML or JSON spec")
    p.add_argument("spec")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merge at the output")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", action="store_true", help="print a JSON summary (or error) on stdout")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("validate", help="check a spec and its checkpoints without merging")
    p.add_argument("spec")
    p.add_argument("--overwrite", action="store_true", help="do not report an existing output as an error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_validate)


def new_parser(description: str) -> tuple[argparse.ArgumentParser, object]:
    """The ``drmerge`` parser with ``--version`` and an empty set of subcommands."""
    from .version import __version__

    parser = argparse.ArgumentParser(prog="drmerge", description=description)
    parser.add_argument("--version", action="version", version=f"drmerge {__version__}")
    return parser, parser.add_subparsers(dest="command", required=True)


def build_parser() -> argparse.ArgumentParser:
    parser, sub = new_parser("Merge fine-tuned models with DRM: the engine's commands. The service, dev-stack, "
                             "key and client commands are in the `drmerge` console script "
                             "(python -m drmerge_ops).")
    register(sub)
    return parser


def run(parser: argparse.ArgumentParser, argv=None) -> int:
    """Parse ``argv`` and run the chosen command under the exit-code contract above."""
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MergeError as e:
        return _fail(args, e.code, e.message, e.param)
    except KeyboardInterrupt:
        return _fail(args, "cancelled", "interrupted")


def main(argv=None) -> int:
    return run(build_parser(), argv)


def _fail(args, code: str, message: str, param=None) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message, "param": param}}))
    print(f"error: {code}: {message}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
