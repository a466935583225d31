"""Refresh the "Measured figures" sections of docs/*.md from benchmarks/results/*.csv / *.json.

    python docs/figures.py

Each page holds ``<!-- figures:OP[:CASE_PREFIX,...] -->`` ... ``<!-- /figures -->``; the text between the markers is
regenerated: one table per device that has a result file, and "not measured" for CPU / GPU without one.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARK = re.compile(r"<!-- figures:(?P<spec>[^>]*?) -->.*?<!-- /figures -->", re.S)


def _ms(v: str) -> str:
    return "-" if v in ("", None) else f"{float(v):.3g}"


def _section(op: str, prefixes: list[str]) -> str:
    out = []
    for device, label in (("cpu", "CPU"), ("cuda", "GPU")):
        path = RESULTS / f"{op}-{device}.csv"
        if not path.exists():
            out.append(f"**{label} not measured** (no `benchmarks/results/{op}-{device}.csv`; run "
                       f"`python -m vlmkern bench --op {op} --device {device}`).\n")
            continue
        meta = json.loads(path.with_suffix(".json").read_text())
        env = meta["env"]
        rows = [r for r in csv.DictReader(path.open()) if not prefixes or r["case"].startswith(tuple(prefixes))]
        out.append(f"**{label}: {env.get('device_name', device)}**, torch {env.get('torch')}, "
                   f"{'quick' if meta.get('quick') else 'full'} run of {env.get('timestamp', '?')} "
                   f"(`benchmarks/results/{path.name}`). Times in ms, median (p20, p80); speedup = "
                   f"{meta.get('speedup_definition', 'baseline / vlmkern')}.\n")
        # GPU runs: CUDA-graph time of launch-bound calls and % of the ceilings measured on that GPU
        extra = [c for c in ("graph_ms", "pct_gemm_peak", "pct_copy_peak") if any(r.get(c) for r in rows)]
        heads = {"graph_ms": "graph ms", "pct_gemm_peak": "% GEMM peak", "pct_copy_peak": "% copy peak"}
        out.append("| case | shape | implementation | backend | ms | " + "".join(f"{heads[c]} | " for c in extra)
                   + "speedup | status |")
        out.append("|---" * (7 + len(extra)) + "|")
        for r in rows:
            status = r["status"] + (f": {r['note']}" if r["note"] and r["status"] != "ok" else "")
            out.append(f"| {r['case']} | {r['shape']} | {r['impl']} | {r['backend']} | {_ms(r['median_ms'])} "
                       f"({_ms(r['p20_ms'])}, {_ms(r['p80_ms'])}) | " + "".join(f"{_ms(r.get(c))} | " for c in extra)
                       + f"{_ms(r['speedup'])} | {status} |")
        png = path.with_suffix(".png")
        if png.exists():
            out.append(f"\n![{op} {label}](../benchmarks/results/{png.name})\n")
    return "\n".join(out)


def refresh(page: Path) -> bool:
    text = page.read_text()

    def repl(m: re.Match) -> str:
        op, _, cases = m["spec"].partition(":")
        prefixes = [c for c in cases.split(",") if c]
        return f"<!-- figures:{m['spec']} -->\n{_section(op, prefixes)}\n<!-- /figures -->"
    new = MARK.sub(repl, text)
    if new != text:
        page.write_text(new)
    return new != text


if __name__ == "__main__":
    for md in sorted(Path(__file__).parent.glob("*.md")):
        if refresh(md):
            print(f"updated {md.name}")
