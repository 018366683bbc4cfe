"""Run a command with its stderr on a real pseudo-terminal of a given size (Python's
``pty``), as a person at an 80-column terminal sees it, and read what it drew.

``screen_lines`` replays the bytes the way a terminal does (``\\r`` returns to the
start of the line, ``\\n`` starts a new one, ESC[K / ESC[2K clear, a line longer than
the width wraps): the number of lines it leaves is what the person scrolls through.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
import unicodedata

_CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def run_on_pty(argv: list[str], *, columns: int = 80, rows: int = 24, env: dict | None = None, cwd=None,
               timeout: float = 180.0) -> tuple[int, str, bytes]:
    """Run ``argv`` with stdout on a pipe and stderr on a pty of ``columns`` x ``rows``;
    returns (exit status, stdout, the raw bytes written to the terminal)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    full_env = dict(os.environ if env is None else env, COLUMNS=str(columns), LINES=str(rows), TERM="xterm")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=full_env,
                            cwd=cwd)
    os.close(slave)
    raw = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv} did not end within {timeout}s; the terminal shows:\n{raw.decode('utf-8', 'replace')}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                if not chunk:
                    if proc.poll() is not None:
                        break
                    continue
                raw += chunk
            elif proc.poll() is not None:
                break
        stdout = proc.stdout.read().decode("utf-8", "replace")
        proc.wait(10)
    finally:
        os.close(master)
        proc.stdout.close()
    return proc.returncode, stdout, bytes(raw)


def _width(ch: str) -> int:
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def screen_lines(raw: bytes, columns: int = 80) -> list[str]:
    """The lines a terminal of ``columns`` is left with after ``raw`` (scrollback
    included), trailing blanks removed."""
    text = raw.decode("utf-8", "replace").replace("\r\n", "\n")
    lines: list[list[str]] = [[]]
    col = 0
    pending_wrap = False
    i = 0
    while i < len(text):
        m = _CSI.match(text, i)
        if m:
            arg, cmd = m.group(1), m.group(2)
            line = lines[-1]
            if cmd == "K":
                if arg in ("", "0"):
                    del line[col:]
                elif arg == "2":
                    line[:] = [" "] * col
            elif cmd == "A":  # cursor up (tqdm moves up to redraw nested bars)
                n = int(arg or 1)
                for _ in range(n):
                    if len(lines) > 1:
                        lines.pop()  # approximated: the next writes land on the line above
            i = m.end()
            continue
        ch = text[i]
        i += 1
        if ch == "\r":
            col, pending_wrap = 0, False
        elif ch == "\n":
            lines.append([])
            col, pending_wrap = 0, False
        elif ch == "\x1b":
            continue
        elif ch >= " ":
            w = _width(ch)
            if pending_wrap or col + w > columns:
                lines.append([])
                col, pending_wrap = 0, False
            line = lines[-1]
            while len(line) < col:
                line.append(" ")
            if col < len(line):
                line[col] = ch
            else:
                line.append(ch)
            col += w
            if col >= columns:
                pending_wrap = True
    out = ["".join(line).rstrip() for line in lines]
    while out and not out[-1]:
        out.pop()
    return out


def segments(raw: bytes) -> list[str]:
    """Every redraw: the text between two ``\\r``/``\\n``, escape sequences removed."""
    text = _CSI.sub("", raw.decode("utf-8", "replace"))
    return [s for s in re.split(r"[\r\n]", text) if s.strip()]


def display_width(s: str) -> int:
    return sum(_width(ch) for ch in s)
