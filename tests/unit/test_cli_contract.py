"""drmerge.cli.run's contract for whatever a command raises: exit non-zero and end with
one `error: <code>: <message>` line (multi-line messages print their detail first)."""

from __future__ import annotations

import pytest

from drmerge import cli


def _run(func, argv=("boom",)):
    parser, sub = cli.new_parser("test")
    sub.add_parser("boom").set_defaults(func=func)
    return cli.run(parser, list(argv))


def _raise(exc):
    def func(args):
        raise exc
    return func


def test_an_unexpected_exception_is_one_internal_error_line(capsys, monkeypatch):
    monkeypatch.delenv("DRMERGE_DEBUG", raising=False)
    assert _run(_raise(ZeroDivisionError("division by zero"))) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: internal_error: unexpected ZeroDivisionError: division by zero "
                                        "(DRMERGE_DEBUG=1 shows the traceback)"]


def test_debug_shows_the_traceback_before_the_line(capsys, monkeypatch):
    monkeypatch.setenv("DRMERGE_DEBUG", "1")
    assert _run(_raise(KeyError("x"))) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("Traceback") and err[-1] == "error: internal_error: unexpected KeyError: 'x'"


def test_a_command_error_keeps_its_code_and_exit_and_its_detail_comes_first(capsys):
    assert _run(_raise(cli.CommandError("unavailable", "it did not start: port taken\nlog line 1\nlog line 2",
                                        exit_code=3))) == 3
    assert capsys.readouterr().err.strip().splitlines() == ["log line 1", "log line 2",
                                                            "error: unavailable: it did not start: port taken"]


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        _run(None, ["nope"])
    assert e.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: invalid_request: argument command")
