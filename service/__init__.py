"""The drmerge HTTP service: FastAPI app, Redis job store, webhooks, settings.

Nothing in this package imports torch: the API process validates specs with the
torch-free ``drmerge.spec`` and hands work to Celery workers by task name.
"""
