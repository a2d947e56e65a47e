"""Accuracy benchmarks: the README results tables, the LSQ fidelity check, the refactor
fingerprint."""
