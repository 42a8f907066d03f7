"""Run every shipped study with its offline defaults in both memory layouts: wall time against budget, and verdict.

    python benchmarks/studies.py                    # every study, both layouts, into a temporary directory
    python benchmarks/studies.py --only inits,norms --layouts true --out studies-bench --jobs 2

Each study runs as a user runs it (`reslab study NAME --channels-last L --out DIR/NAME-L`),
in a fresh process, one after the other, so the wall time includes start-up, data loading,
the measurements and the report.  It runs once with `--channels-last true` and once with
`false`: two floating-point paths through the same convolutions, as two CPUs differ, so a
study whose verdict hangs on the last bits of a sum shows two different verdicts here.
The table gives the wall time, the study's stated budget on 2 CPU cores and their ratio,
and the verdict computed from the study's own runs (`verdict.json`).  Studies whose
directory already holds finished runs would be skipped by the sweep: use a fresh `--out`
(the default is a new temporary directory) for timings.  Exit 1 when a study is undecided,
when its two layouts disagree, or when it takes longer than 300 s.
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
    parser.add_argument("--layouts", default="true,false",
                        help="--channels-last values to run each study with (default: true,false)")
    args = parser.parse_args()

    studies = shipped_studies()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(studies)
    unknown = [n for n in names if n not in studies]
    if unknown:
        print(f"unknown study {unknown[0]!r}; valid choices: {', '.join(studies)}", file=sys.stderr)
        return 2
    layouts = [v.strip() for v in args.layouts.split(",") if v.strip()]
    root = Path(args.out or tempfile.mkdtemp(prefix="reslab-studies-"))
    print(f"studies into {root}, {os.cpu_count()} CPU cores, --jobs {args.jobs or 'as each study says'}, "
          f"--channels-last {', '.join(layouts)}")
    rows = []
    for name in names:
        for layout in layouts:
            out = root / f"{name}-channels-last-{layout}"
            started = time.perf_counter()
            jobs = ["--jobs", str(args.jobs)] if args.jobs else []
            done = subprocess.run([sys.executable, "-m", "reslab", "study", name, "--out", str(out), *jobs,
                                   "--channels-last", layout, "--progress", "none"], capture_output=True, text=True)
            seconds = time.perf_counter() - started
            verdict_file = out / "verdict.json"
            if verdict_file.is_file():
                verdict = json.loads(verdict_file.read_text())["verdict"]
            else:
                last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
                verdict = f"no verdict (exit {done.returncode}: {last})"
            rows.append((name, layout, seconds, studies[name].budget_s, verdict))
            print(f"  {name} --channels-last {layout}: {seconds:.0f} s, {verdict}", flush=True)

    print()
    print(f"{'study':<12} {'channels-last':>13} {'jobs':>4} {'wall s':>8} {'budget s':>9} {'wall/budget':>12}  verdict")
    for name, layout, seconds, budget, verdict in rows:
        ratio = f"{seconds / budget:.2f}" if budget else "-"
        jobs = args.jobs or studies[name].jobs
        print(f"{name:<12} {layout:>13} {jobs:>4} {seconds:>8.0f} {budget or 0:>9.0f} {ratio:>12}  {verdict}")
    verdicts = {}
    for name, _, _, _, verdict in rows:
        verdicts.setdefault(name, set()).add(verdict)
    undecided = [n for n, v in verdicts.items() if v - {"supported", "not supported"}]
    split = [n for n, v in verdicts.items() if len(v) > 1]
    slow = sorted({r[0] for r in rows if r[2] > 300})
    for what, which in (("undecided", undecided), ("different verdicts in the two layouts", split),
                        ("over 300 s", slow)):
        if which:
            print(f"{what}: {', '.join(which)}")
    return 1 if undecided or split or slow else 0


if __name__ == "__main__":
    sys.exit(main())
