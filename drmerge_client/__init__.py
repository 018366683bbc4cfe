"""The typed HTTP client of the drmerge API: ``from drmerge_client import Client, ApiError``.

Needs only httpx (and the one job-status definition of the service); the ``drmerge``
terminal commands (``submit``, ``status``, ``wait``, ...) are built on it.
"""

from .client import ApiError, Client, default_api_key, default_api_url

__all__ = ["ApiError", "Client", "default_api_key", "default_api_url"]
