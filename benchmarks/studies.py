"""Run every shipped study with its offline defaults: wall time against its budget, and its verdict.

    python benchmarks/studies.py                    # every study, into a temporary directory
    python benchmarks/studies.py --only inits,norms --out studies-bench --jobs 2

Each study runs as a user runs it (`reslab study NAME --out DIR/NAME`), in a fresh
process, one after the other, so the wall time includes start-up, data loading and the
report. The table gives the wall time, the study's stated budget on 2 CPU cores and their
ratio, and the verdict computed from the study's own runs (`verdict.json`). Studies
whose directory already holds finished runs would be skipped by the sweep: use a fresh
`--out` (the default is a new temporary directory) for timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    from reslab.studies import shipped_studies

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma list of study names (default: all)")
    parser.add_argument("--out", default=None, help="where the study directories go (default: a new temp dir)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="passed to reslab study --jobs (default: each study's own, as a user gets it)")
    args = parser.parse_args()

    studies = shipped_studies()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(studies)
    unknown = [n for n in names if n not in studies]
    if unknown:
        print(f"unknown study {unknown[0]!r}; valid choices: {', '.join(studies)}", file=sys.stderr)
        return 2
    root = Path(args.out or tempfile.mkdtemp(prefix="reslab-studies-"))
    print(f"studies into {root}, {os.cpu_count()} CPU cores, --jobs {args.jobs or 'as each study says'}")
    rows = []
    for name in names:
        out = root / name
        started = time.perf_counter()
        jobs = ["--jobs", str(args.jobs)] if args.jobs else []
        done = subprocess.run([sys.executable, "-m", "reslab", "study", name, "--out", str(out), *jobs,
                               "--progress", "none"], capture_output=True, text=True)
        seconds = time.perf_counter() - started
        verdict_file = out / "verdict.json"
        verdict = json.loads(verdict_file.read_text())["verdict"] if verdict_file.is_file() else \
            f"no verdict (exit {done.returncode}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''})"
        budget = studies[name].budget_s
        rows.append((name, seconds, budget, verdict))
        print(f"  {name}: {seconds:.0f} s, {verdict}", flush=True)

    print()
    print(f"{'study':<12} {'jobs':>4} {'wall s':>8} {'budget s':>9} {'wall/budget':>12}  verdict")
    for name, seconds, budget, verdict in rows:
        ratio = f"{seconds / budget:.2f}" if budget else "-"
        jobs = args.jobs or studies[name].jobs
        print(f"{name:<12} {jobs:>4} {seconds:>8.0f} {budget or 0:>9.0f} {ratio:>12}  {verdict}")
    return 0 if all(r[3] == "supported" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
