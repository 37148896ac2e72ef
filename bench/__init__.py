"""Benchmark of the serving service: ``python -m bench.run`` (see docs/benchmark.md)."""
