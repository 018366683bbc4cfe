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
import os
import sys
import traceback

from .errors import MergeError

EXIT_ERROR = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A command's failure with a stable ``code`` (the engine's codes, or those of the
    service commands: ``invalid_config``, ``invalid_request``, ``unavailable``,
    ``not_found``, ...) and the exit status to end with."""

    def __init__(self, code: str, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.code, self.message, self.exit_code = code, message, exit_code


class ProgressBar:
    """``run_merge``'s progress callback for ``drmerge merge``: the engine's stages and
    tensor counts on a drmerge.progress_bar.TerminalProgress."""

    def __init__(self, stream=None):
        from .progress_bar import TerminalProgress

        self.bar = TerminalProgress(stream if stream is not None else sys.stderr)

    def __call__(self, p) -> None:
        final = p.stage == "done"
        self.bar.update(p.stage, p.tensors_done, p.tensors_total,
                        note=f"{p.bytes_read / 1e6:,.0f} MB in, {p.bytes_written / 1e6:,.0f} MB out",
                        final=final)


def _load(path: str, overwrite: bool = False):
    from .spec import load_spec_file

    spec = load_spec_file(path)
    return spec.with_overrides(overwrite=True) if overwrite else spec


def cmd_merge(args) -> int:
    from .pipeline import run_merge

    spec = _load(args.spec, args.overwrite)
    if args.json:
        print(json.dumps(run_merge(spec, device=args.device).to_dict()))
        return 0
    bar = ProgressBar()
    try:
        # The engine's warnings go above the bar as they happen (not into its line).
        with bar.bar.warnings_above() as shown:
            result = run_merge(spec, device=args.device, progress=bar)
    finally:
        bar.bar.close()
    for w in result.warnings:
        if w not in shown:
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


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors keep the contract: the usage, then ``error:
    invalid_request: <message>`` as the last line, exit 2 (subcommands' parsers are of
    this class too)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        print(f"error: invalid_request: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def new_parser(description: str) -> tuple[argparse.ArgumentParser, object]:
    """The ``drmerge`` parser with ``--version`` and an empty set of subcommands."""
    from .version import __version__

    parser = Parser(prog="drmerge", description=description)
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
    except CommandError as e:
        return _fail(args, e.code, e.message, exit_code=e.exit_code)
    except KeyboardInterrupt:
        return _fail(args, "cancelled", "interrupted")
    except Exception as e:  # a bug: still one error line (the traceback on request)
        if os.environ.get("DRMERGE_DEBUG"):
            traceback.print_exc()
        hint = "" if os.environ.get("DRMERGE_DEBUG") else " (DRMERGE_DEBUG=1 shows the traceback)"
        return _fail(args, "internal_error", f"unexpected {type(e).__name__}: {e}{hint}")


def main(argv=None) -> int:
    return run(build_parser(), argv)


def _fail(args, code: str, message: str, param=None, exit_code: int = EXIT_ERROR) -> int:
    """The contract's last stderr line. A message of several lines (a server's log tail)
    prints its later lines first, so the ``error:`` line stays one line and the last."""
    first, _, rest = str(message).strip().partition("\n")
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": code, "message": message, "param": param}}))
    if rest.strip():
        print(rest.rstrip(), file=sys.stderr)
    print(f"error: {code}: {first}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
