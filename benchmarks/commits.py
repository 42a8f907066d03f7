#!/usr/bin/env python
"""Training throughput of two commits of reslab, measured in one run: did a change slow training?

Checks out each commit into a temporary worktree and runs that commit's own
``benchmarks/train_throughput.py`` against that commit's ``src/`` (so each side
trains with its own code), one timed window per process, the two commits taking
turns for ``--rounds`` rounds.  Alternating in one run lets both sides see the
same machine: a CPU that slows down or speeds up during the run moves both.

Prints, per commit, reslab's images/s (median over rounds, and the spread) and the
tutorial baseline's (which both commits share unless the change touched it: a
check that the machine stayed the same), then the ratio of the medians::

    python benchmarks/commits.py 4f0b4fa HEAD              # cifar_resnet20, CPU, 6 rounds
    python benchmarks/commits.py v0.1 HEAD --rounds 10 -- --norm gn --batch-size 64

Arguments after ``--`` go to train_throughput.py on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _worktree(ref: str, into: Path) -> Path:
    """A detached checkout of ``ref`` under ``into`` (removed with the temporary directory)."""
    path = into / ref.replace("/", "_")
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), ref],
                   check=True, capture_output=True, text=True)
    return path


def _window(tree: Path, extra: list[str], out: Path) -> dict[str, float]:
    """One process of ``tree``'s throughput benchmark: one warm-up, one timed window per side."""
    command = [sys.executable, str(tree / "benchmarks" / "train_throughput.py"), "--rounds", "1",
               "--channels-last", "auto", "--json", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}  # this commit's reslab, not the installed one
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"commits: {tree.name}: train_throughput.py failed: {done.stderr.strip().splitlines()[-1]}")
    rows = json.loads(out.read_text())["rows"]
    return {row["side"]: row["img_per_s"] for row in rows}


def _line(name: str, values: list[float]) -> str:
    median = statistics.median(values)
    return (f"{name:<12} {median:10.1f} img/s   min {min(values):8.1f}   max {max(values):8.1f}"
            f"   ({len(values)} windows)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the earlier commit (any git ref)")
    parser.add_argument("after", nargs="?", default="HEAD", help="the later commit (default HEAD)")
    parser.add_argument("--rounds", type=int, default=6, help="timed windows per commit, alternating")
    args = parser.parse_args(own)
    with tempfile.TemporaryDirectory(prefix="reslab-commits-") as tmp:
        trees = {ref: _worktree(ref, Path(tmp)) for ref in (args.before, args.after)}
        reslab: dict[str, list[float]] = {ref: [] for ref in trees}
        baseline: dict[str, list[float]] = {ref: [] for ref in trees}
        try:
            for i in range(args.rounds):
                order = list(trees) if i % 2 == 0 else list(reversed(trees))  # neither side always goes first
                for ref in order:
                    sides = _window(trees[ref], extra, Path(tmp) / f"{i}-{ref.replace('/', '_')}.json")
                    reslab[ref].append(sides["reslab"])
                    baseline[ref].append(sides["baseline"])
                    print(f"round {i + 1}/{args.rounds} {ref}: reslab {sides['reslab']:.1f} img/s, "
                          f"baseline {sides['baseline']:.1f} img/s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    print()
    for ref in trees:
        print(_line(f"{ref} reslab", reslab[ref]))
        print(_line(f"{ref} baseline", baseline[ref]))
    ratio = statistics.median(reslab[args.after]) / statistics.median(reslab[args.before])
    control = statistics.median(baseline[args.after]) / statistics.median(baseline[args.before])
    print(f"\nreslab {args.after} / {args.before}: {ratio:.3f}  (baseline, the same code on both sides: {control:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
