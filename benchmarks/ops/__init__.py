"""One module per op family; each exposes ``cases(device, quick, smoke=False) -> list[benchmarks.harness.Case]``."""
