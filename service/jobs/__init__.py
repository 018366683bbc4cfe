"""The job domain: what a merge job is, where its state lives and how it is queued.

One concept per module, each importable on its own (nothing is imported here, so
``service.jobs.status`` stays pure Python for drmerge_client)."""
