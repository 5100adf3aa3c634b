"""Benchmarks: bitcompiler against baselines run in the same process (``python -m bench``)."""
