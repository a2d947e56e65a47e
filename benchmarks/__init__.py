"""Benchmarks of bwrf_ext: pytest-benchmark timings and scripts that print ratio tables."""
