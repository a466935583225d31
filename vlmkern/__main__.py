"""``python -m vlmkern``: ``info`` (versions, devices, and per op which backends can run here and why not),
``parity`` (every drop-in against its original, table of max errors), ``bench`` (the benchmark suites)."""
from __future__ import annotations

import argparse
import platform
import sys


def _versions() -> dict[str, str]:
    import torch

    import vlmkern

    out = {"python": platform.python_version(), "vlmkern": vlmkern.__version__, "torch": torch.__version__,
           "torch cuda": str(torch.version.cuda)}
    for name in ("triton", "transformers", "xformers", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = "not installed"
    return out


def info() -> int:
    import torch

    from vlmkern.ops import dispatch as _dispatch

    print("vlmkern environment")
    for k, v in _versions().items():
        print(f"  {k:<13} {v}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"  {'gpu':<13} {gpu}")
    forced = _dispatch.forced_backend()
    print(f"  {'backend':<13} {forced or 'auto'} ({_dispatch.ENV_VAR})")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\nops on {dev.type}: backends in preference order ('ok' = can run; else why not)")
        for op, backends in _dispatch.environment_report(dev).items():
            print(f"  {op}")
            for backend, reasons in backends.items():
                print(f"    {backend:<10} {'ok' if not reasons else 'no: ' + '; '.join(reasons)}")
    return 0


def parity(only: str | None) -> int:
    from vlmkern import parity as _parity

    return _parity.main(only)


def bench(rest: list[str]) -> int:
    """Run ``benchmarks.run`` (it lives in the repository, not in the installed package)."""
    try:
        from benchmarks import run as bench_run
    except ImportError as exc:
        print(f"python -m vlmkern bench needs the repository checkout: run it from the repository root, where "
              f"the benchmarks/ package lives ({exc}). Equivalent: python -m benchmarks.run {' '.join(rest)}",
              file=sys.stderr)
        return 2
    result = bench_run.main(rest)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmkern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and backend availability per op")
    p = sub.add_parser("parity", help="every drop-in against its original on random weights: table of max errors")
    p.add_argument("--only", default=None, help="run only components whose name contains this text")
    sub.add_parser("bench", help="run the benchmark suites (python -m benchmarks.run; arguments are passed on)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return info()
    if args.command == "parity":
        return parity(args.only)
    return 2


if __name__ == "__main__":
    sys.exit(main())
