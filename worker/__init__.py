"""Celery workers that run merges. Thin on purpose: the merge itself is drmerge.pipeline."""
