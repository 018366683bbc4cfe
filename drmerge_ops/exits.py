"""Exit codes of the ``drmerge`` service and client commands (scripts rely on them).

Engine commands (``merge``, ``validate``) follow drmerge.cli: 0 ok, 1 failed, 2 usage.
"""

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_API = 0, 1, 2, 3

# ``drmerge wait`` (and ``submit --wait``): how the job ended.
WAIT_EXIT = {"succeeded": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
