"""Benchmarks: ``python -m tests.benchmarks [name ...]`` (``make bench``).

Each ``bench_<name>.py`` module has ``main(argv) -> int`` and prints a table whose ratios compare
against a baseline measured in the same run. These machines are small and noisy: read ratios,
not absolute times.
"""
