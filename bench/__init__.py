"""Benchmarks: run one with ``python -m bench.<name>``; results go to docs/benchmarks-history.md, the current table to docs/benchmarks.md."""
