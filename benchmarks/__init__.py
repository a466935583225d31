"""Benchmark suites: ``python -m benchmarks.run`` times every vlmkern op against its alternatives."""
