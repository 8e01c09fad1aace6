"""Throughput and memory benchmarks of natvision, reported as ratios.

``python -m benchmarks.run`` measures, in one run on one machine, the bare
forward pass of each model (the ceiling), the natvision job end to end and
the stock Beam way of doing the same, and writes a JSON file that
``python -m benchmarks.report`` turns into ``benchmarks/RESULTS.md``.  See
``benchmarks/README.md``.
"""
