"""The progress bar people see at a terminal: ``drmerge merge`` and ``drmerge wait``.

On a terminal it is a tqdm bar (percentage, rate, ETA) sized to the terminal's width and
redrawn in place, so a narrow terminal never gets a new line per redraw; lines written
with ``write`` (and the engine's logged warnings, under ``warnings_above``) go above the
bar, never into it. Elsewhere (a log file, CI) it prints a plain line at most every few
seconds and on every change of stage, so logs stay short.

Until the number of tensors is known (planning, queued) it shows the stage alone, never
``0/0``.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

from tqdm import tqdm

# The bar once the total is known: "merging   42%|████▏     | 101/241 tensors [00:03<00:04, 31.2 tensors/s] 12 MB written"
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"
LABEL_FORMAT = "{desc}"
NOTE_MIN_COLUMNS = 120


class TerminalProgress:
    """One task's progress on ``stream`` (stderr by default). Call ``update`` as often as
    you like (redraws are throttled), ``write`` for a line above the bar, ``close`` at
    the end (the final bar stays on screen)."""

    def __init__(self, stream=None, unit: str = "tensors", plain_interval_s: float = 5.0):
        self.stream = stream if stream is not None else sys.stderr
        self.unit = unit
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.plain_interval_s = plain_interval_s
        self._bar: tqdm | None = None
        self._counting = False  # the bar shows counts (the total is known)
        self._last_plain = ("", 0.0)

    # --- drawing ------------------------------------------------------------------------
    def update(self, label: str, done: int = 0, total: int = 0, note: str = "", final: bool = False) -> None:
        """``label``: what is happening (a stage, a job status); ``done``/``total``: units
        so far (``total`` 0: not known yet); ``note``: a short suffix (bytes written)."""
        if self.tty:
            self._update_bar(label, done, total, note, final)
        else:
            self._update_plain(label, done, total, note, final)

    def _update_bar(self, label: str, done: int, total: int, note: str, final: bool) -> None:
        if total > 0 and not self._counting:
            if self._bar is not None:
                self._bar.close()  # the label-only line (leave=False clears it)
            # ``initial``: the rate and the ETA count only what happens while we watch
            # (``drmerge wait`` may attach half-way through a job).
            self._bar = tqdm(total=total, initial=min(done, total), unit=" " + self.unit, desc=label,
                             file=self.stream, dynamic_ncols=True, bar_format=BAR_FORMAT, leave=True,
                             mininterval=0.1, smoothing=0.1)
            self._counting = True
        elif self._bar is None:
            self._bar = tqdm(total=None, desc=label, file=self.stream, dynamic_ncols=True, bar_format=LABEL_FORMAT,
                             leave=False, mininterval=0.1)
        bar = self._bar
        bar.set_description_str(label, refresh=False)
        if self._counting:
            # The note only where the bar keeps room to be read (a wide terminal).
            width = bar.ncols or 80
            bar.set_postfix_str(note if note and width >= NOTE_MIN_COLUMNS else "", refresh=False)
            if total != bar.total:
                bar.total = total
            step = min(done, total) - bar.n
            if step > 0:
                bar.update(step)  # redraws when mininterval allows
            if final or step <= 0:
                bar.refresh()
        else:
            bar.set_description_str(label, refresh=True)
        if final:
            self.close()

    def _update_plain(self, label: str, done: int, total: int, note: str, final: bool) -> None:
        line = label
        if total > 0:
            line += f"  {done}/{total} {self.unit}  {100 * done / total:.0f}%" + (f"  {note}" if note else "")
        last_line, last_at = self._last_plain
        now = time.monotonic()
        changed_label = not last_line.startswith(label + " ") and last_line != label
        if line != last_line and (final or changed_label or now - last_at >= self.plain_interval_s):
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_plain = (line, now)

    def write(self, line: str) -> None:
        """A line above the bar (the bar is cleared, the line written, the bar redrawn)."""
        if self.tty and self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self, clear: bool = False) -> None:
        """End the bar: it stays on screen, or with ``clear`` it is wiped."""
        if self._bar is not None:
            if clear:
                self._bar.leave = False
            self._bar.close()
            self._bar = None
        self._counting = False

    # --- the engine's warnings ----------------------------------------------------------
    @contextmanager
    def warnings_above(self, logger: str = "drmerge", prefix: str = "warning: "):
        """While inside, warnings logged under ``logger`` are written above the bar as
        ``prefix + message`` (and only there: not also by the root logger's handlers).
        Yields the list of messages shown, so a summary need not repeat them."""
        shown: list[str] = []
        handler = _ToBar(self, prefix, shown)
        log = logging.getLogger(logger)
        propagate = log.propagate
        log.addHandler(handler)
        log.propagate = False
        try:
            yield shown
        finally:
            log.removeHandler(handler)
            log.propagate = propagate


class _ToBar(logging.Handler):
    def __init__(self, progress: TerminalProgress, prefix: str, shown: list[str]):
        super().__init__(logging.WARNING)
        self.progress, self.prefix, self.shown = progress, prefix, shown

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
            self.shown.append(message)
            self.progress.write(self.prefix + message)
        except Exception:  # a broken terminal must not fail the merge
            self.handleError(record)

