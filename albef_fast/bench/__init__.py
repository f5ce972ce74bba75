"""Benchmark CLI: ``python -m albef_fast.bench --help``."""
