"""The one error type the engine raises, with the stable codes of docs/DESIGN.md ("Errors").

Every failure a user can cause or meet maps to one of these codes; the CLI prints it,
the service stores it on the job and returns it in problem+json. Anything else that
escapes is a bug and is reported as ``internal_error``.
"""

from __future__ import annotations

CODES = (
    "invalid_spec",
    "input_not_found",
    "access_denied",
    "incompatible_checkpoints",
    "corrupt_checkpoint",
    "non_finite_weights",
    "output_exists",
    "storage_error",
    "timeout",
    "cancelled",
    "internal_error",
)


class MergeError(Exception):
    """A failure with a stable ``code``, a message that says what to fix, and the
    offending spec field (``param``) when there is one."""

    def __init__(self, code: str, message: str, param: str | None = None):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        # Set by a failed run whose output it could not remove (storage unavailable): the
        # objects that may remain, for the caller to remove later (output.discard_partial_output).
        # Not part of the error itself: the code and message stay the original failure's.
        self.cleanup_pending: list[str] = []

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class Cancelled(MergeError):
    """Raised by the pipeline when the cancel hook says stop."""

    def __init__(self, message: str = "the merge was cancelled"):
        super().__init__("cancelled", message)


class Interrupted(Exception):
    """Raised by the pipeline when its ``should_pause`` hook says stop: unlike a cancel,
    the shards committed so far are kept (and were reported through ``on_shard``), so a
    later run given them as ``completed_shards`` resumes instead of starting over. Not a
    failure, so it carries no error code."""

    def __init__(self, message: str = "the merge was interrupted; its committed shards were kept for a resume",
                 kept: int = 0):
        super().__init__(message)
        self.kept = kept


class StopPoll:
    """Asks a stop hook (the engine's ``should_cancel``, which the service also uses for
    the time limit) from loops that may run long before any tensor is merged: reading
    headers over S3, matching patterns, fingerprinting, verifying kept shards. Raises
    ``Cancelled`` when the hook says stop (a hook may raise ``Interrupted`` itself). The
    hook is asked at most every ``interval_s``, so the loops may call this freely."""

    def __init__(self, should_stop=None, interval_s: float = 0.02):
        import time

        self._clock = time.monotonic
        self.should_stop = should_stop
        self.interval_s = interval_s
        self._last = float("-inf")

    def __call__(self) -> None:
        if self.should_stop is None:
            return
        now = self._clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        if self.should_stop():
            raise Cancelled()
