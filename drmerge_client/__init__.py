"""The Python client of the drmerge HTTP API.

    from drmerge_client import Client, JobStatus

    with Client("http://127.0.0.1:8000", api_key="drm_...") as c:
        job = c.create(spec, metadata={"run": "42"})        # an Idempotency-Key per create
        job = c.wait(job.id, on_progress=lambda j: print(j.status, j.progress.fraction))
        if job.status is JobStatus.SUCCEEDED:
            print(job.result.output, [f.name for f in job.result.files])
        for j in c.list(status="failed", metadata={"team": "nlp"}):   # every page
            print(j.id, j.error.code)

Needs httpx and tenacity (``pip install 'drmerge[client]'``) and, of the project, only the
job status enum (service.jobs.status); the ``drmerge`` terminal commands are built on it.
"""

from service.jobs.status import JobStatus

from .client import ApiError, Client, default_api_key, default_api_url
from .models import DownloadLink, Event, Job, JobError, Page, Progress, ProgressUpdate, Result, ResultFile, Webhook

__all__ = [
    "ApiError", "Client", "DownloadLink", "Event", "Job", "JobError", "JobStatus", "Page", "Progress",
    "ProgressUpdate", "Result", "ResultFile", "Webhook", "default_api_key", "default_api_url",
]
