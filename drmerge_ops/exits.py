"""Exit codes of the ``drmerge`` service and client commands (scripts rely on them).

Engine commands (``merge``, ``validate``) follow drmerge.cli: 0 ok, 1 failed, 2 usage.
"""

from service.jobs.status import JobStatus

EXIT_OK, EXIT_FAILED, EXIT_CANCELLED, EXIT_API = 0, 1, 2, 3

# ``drmerge wait`` (and ``submit --wait``): how the job ended.
WAIT_EXIT = {JobStatus.SUCCEEDED: EXIT_OK, JobStatus.FAILED: EXIT_FAILED, JobStatus.CANCELLED: EXIT_CANCELLED}
