"""End-to-end tests: real API and worker processes over HTTP, the dev stack, the CLI."""
