"""Regular expressions from inputs: one guarded compile, one time-bounded match.

Patterns reach the engine from the user's spec (``select.linear/exclude/ignore``) and from
files (the ``rank_pattern``/``alpha_pattern`` keys of an ``adapter_config.json``). Both are
hostile input, and a pattern can hold a worker in two ways:

- **Compiling.** The ``regex`` engine unrolls counted repeats when it compiles, so the
  31-byte ``(?:(?:(?:a{99}){99}){99}){99}`` grows memory by ~200 MB/s for minutes, and no
  match timeout covers compiling. So every pattern is checked *before* it is compiled: its
  length, its syntax (Python's ``re``, which parses counted repeats without unrolling them)
  and the size it unrolls to, alone (MAX_PATTERN_SIZE) and summed over its source
  (MAX_TOTAL_PATTERN_SIZE: one spec, one adapter config). Compiling costs ~10 us and
  ~250 bytes per unrolled element, so a source compiles in a few seconds at most.
- **Matching.** ``(.*){1,32000}[bc]`` backtracks exponentially in the name's length. The
  ``regex`` engine can stop a match after a timeout (``re`` cannot be interrupted), so each
  match gets MATCH_TIMEOUT_S and one ``Matcher`` (one plan, one adapter) MATCH_BUDGET_S in
  all. Refusing nested quantifiers up front would also refuse harmless patterns like
  ``(layers\\.\\d+\\.)*weight`` and still miss others such as ``(a|aa)*``; a time bound is exact.

A refused pattern is a ``MergeError`` that names where it came from, with the code of its
source: ``invalid_spec`` for the user's spec, ``corrupt_checkpoint`` for a file's content.
Nothing else in the engine compiles or matches an input's pattern.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import regex

from .errors import MergeError

MAX_PATTERN_LENGTH = 512
MAX_PATTERN_SIZE = 100_000  # elements once counted repeats are unrolled (see expanded_size)
MAX_TOTAL_PATTERN_SIZE = 200_000  # the same, summed over the patterns of one source
MATCH_TIMEOUT_S = 0.5
MATCH_BUDGET_S = 120.0

_COMPILE_ERRORS = (re.error, regex.error, ValueError, OverflowError, RecursionError, TypeError, MemoryError)


@dataclass(frozen=True)
class Pattern:
    """A checked, compiled pattern and where it came from (for errors)."""
    text: str  # as given
    label: str  # "select.linear[0]", "models[1] (s3://b/a/): adapter_config.json rank_pattern key"
    code: str  # error code of its source
    param: str | None
    size: int  # elements once unrolled
    compiled: regex.Pattern


def _shown(text) -> str:
    return repr(text[:80] + ("..." if len(text) > 80 else "")) if isinstance(text, str) else repr(text)


def _refuse(code: str, label: str, text, what: str, param: str | None):
    raise MergeError(code, f"{label} {_shown(text)}: {what}", param=param)


def _checked(text, label: str, code: str, param: str | None, wrap: Callable[[str], str] | None) -> tuple[str, int]:
    """The text to compile and its unrolled size, or a MergeError; compiles nothing big."""
    if not isinstance(text, str) or len(text) > MAX_PATTERN_LENGTH:
        _refuse(code, label, text, f"must be a regular expression of at most {MAX_PATTERN_LENGTH} characters", param)
    full = wrap(text) if wrap else text
    try:
        re.compile(full)  # the syntax is Python's re (what PEFT and the spec's docs say)
    except _COMPILE_ERRORS as e:
        _refuse(code, label, text, f"is not a valid regular expression: {e}", param)
    size = expanded_size(full)
    if size > MAX_PATTERN_SIZE:
        _refuse(code, label, text, f"repeats too much: counted repetitions expand to about {size} elements "
                f"(at most {MAX_PATTERN_SIZE}); use + or * instead of large nested {{m,n}} counts", param)
    return full, size


def _compile(text: str, full: str, label: str, code: str, param: str | None) -> regex.Pattern:
    try:
        # Not cached: a process that validates many specs (the API) must not keep them all.
        return regex.compile(full, cache_pattern=False)
    except _COMPILE_ERRORS as e:
        _refuse(code, label, text, f"is not a valid regular expression: {e}", param)


def compile_patterns(items: Iterable[tuple[str, str, str | None]], *, code: str, source: str,
                     wrap: Callable[[str], str] | None = None, poll: Callable[[], None] | None = None) -> list[Pattern]:
    """Check and compile the patterns of one source: ``items`` are ``(text, label, param)``.

    ``source`` names the whole (``select``, ``models[1] (...): adapter_config.json``) for
    the total-size error; ``wrap`` turns a pattern into what is compiled (PEFT's
    ``(.*\\.)?(key)$``); ``poll`` is called between patterns (cancel, time limit).
    The same text appears once in the total and is compiled once."""
    out: list[Pattern] = []
    done: dict[str, Pattern] = {}
    total = 0
    for text, label, param in items:
        if poll is not None:
            poll()
        if isinstance(text, str) and text in done:
            out.append(Pattern(text, label, code, param, done[text].size, done[text].compiled))
            continue
        full, size = _checked(text, label, code, param, wrap)
        total += size
        if total > MAX_TOTAL_PATTERN_SIZE:
            raise MergeError(code, f"{source}: its regular expressions together expand to more than "
                             f"{MAX_TOTAL_PATTERN_SIZE} elements (counted repetitions unrolled); use fewer or "
                             "simpler patterns", param=param)
        p = Pattern(text, label, code, param, size, _compile(text, full, label, code, param))
        done[text] = p
        out.append(p)
    return out


def compile_pattern(text: str, label: str, *, code: str = "invalid_spec", param: str | None = None,
                    wrap: Callable[[str], str] | None = None) -> Pattern:
    """One pattern through the same checks (a source of one)."""
    return compile_patterns([(text, label, param)], code=code, source=label, wrap=wrap)[0]


class Matcher:
    """Time-bounded matching: each match at most MATCH_TIMEOUT_S, all matches of this
    matcher at most ``budget_s``; ``poll`` (cancel, time limit) is called before each."""

    def __init__(self, budget_s: float = MATCH_BUDGET_S, poll: Callable[[], None] | None = None):
        self.budget_s = budget_s
        self.spent = 0.0
        self.poll = poll

    def fullmatch(self, p: Pattern, text: str, what: str) -> bool:
        """Whether ``p`` matches all of ``text`` (``what`` says what text is, for errors)."""
        return self._run(p.compiled.fullmatch, p, text, what)

    def match(self, p: Pattern, text: str, what: str) -> bool:
        """Whether ``p`` matches ``text`` from its start (``re.match``)."""
        return self._run(p.compiled.match, p, text, what)

    def _run(self, method, p: Pattern, text: str, what: str) -> bool:
        if self.poll is not None:
            self.poll()
        left = self.budget_s - self.spent
        t0 = time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            return method(text, timeout=min(MATCH_TIMEOUT_S, left)) is not None
        except TimeoutError:
            raise MergeError(
                p.code, f"{p.label} {_shown(p.text)} takes too long to match {what} (over {MATCH_TIMEOUT_S}s for "
                f"{text[:80]!r}, or {self.budget_s:g}s in all): it backtracks catastrophically; use a simpler "
                "pattern (avoid nested or overlapping repetition)", param=p.param) from None
        finally:
            self.spent += time.monotonic() - t0


def expanded_size(pattern: str) -> int:
    """How big a pattern gets once counted repeats are unrolled (``(?:a{99}){99}`` ->
    9801), as the ``regex`` engine does when it compiles. 0 if the parser is unavailable
    (then only the length and the match timeouts bound a pattern)."""
    try:
        from re import _constants as C, _parser
    except ImportError:  # pragma: no cover - a future Python without these
        return 0
    repeats = {C.MAX_REPEAT, C.MIN_REPEAT, getattr(C, "POSSESSIVE_REPEAT", C.MAX_REPEAT)}
    stop = 10 * MAX_TOTAL_PATTERN_SIZE  # enough to refuse; stop multiplying

    def size(items) -> int:
        total = 0
        for op, av in items:
            if op in repeats:
                lo, hi, sub = av
                total += (hi if hi != C.MAXREPEAT else max(lo, 1)) * size(sub)
            elif op is C.BRANCH:
                total += sum(size(alt) for alt in av[1])
            elif op is C.SUBPATTERN:
                total += size(av[-1])
            elif op in (C.ASSERT, C.ASSERT_NOT):
                total += size(av[1])
            elif op is C.ATOMIC_GROUP:
                total += size(av)
            elif op is C.GROUPREF_EXISTS:
                total += size(av[1]) + (size(av[2]) if av[2] else 0)
            else:
                total += 1
            if total > stop:
                return total
        return total

    try:
        return size(_parser.parse(pattern))
    except Exception:
        return 0
