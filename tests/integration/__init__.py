"""Integration tests: real Redis and/or real SeaweedFS S3, driven in-process."""
