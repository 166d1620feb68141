"""Benchmarks of dept_fast: ``pytest bench --benchmark-only``, then ``python -m bench.report``."""
