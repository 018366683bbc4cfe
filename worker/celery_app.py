"""The worker's Celery application: the service's queue definition (service.jobs.queue)
plus the task modules, which only the worker imports (``include``).

``celery -A worker.celery_app`` finds ``app`` or ``celery_app``.
"""

from __future__ import annotations

from service.jobs.queue import make_celery

celery_app = make_celery(include=["worker.tasks"])
app = celery_app
