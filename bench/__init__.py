"""Benchmarks for drmerge (see bench/README.md). Bench-only code: never imported by the engine."""
