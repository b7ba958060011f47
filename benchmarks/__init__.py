"""Benchmarks of trio_cluster (not tests: they never fail a build on a number).

Run ``python -m benchmarks <name>`` or ``python -m benchmarks all --quick``.
Each prints progress on stderr and one JSON object per figure on stdout.
"""
