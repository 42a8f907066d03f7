"""Sweeps: a grid of training configs run into ``OUT/<run-id>/``.

- Every grid point is checked before anything runs, so a bad value anywhere in
  the grid is bad input (exit 2) with nothing written.
- Finished runs (a ``summary.json`` with status completed or diverged) are
  skipped and partial ones resumed from their checkpoint, so rerunning a sweep
  after a crash completes each run exactly once and rerunning a finished sweep
  is a quick no-op.
- Runs execute in this process (``jobs=1``) or in ``jobs`` long-lived worker
  processes (one per GPU where there are several), never one fresh Python per
  run.  A diverged or failed run does not stop the sweep.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import multiprocessing
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import TrainConfig, config_from_dict
from .errors import SpecError
from .fileio import atomic_write_text
from .train import SUMMARY_FILE, preflight

log = logging.getLogger(__name__)

FINISHED = ("completed", "diverged")
SWEEP_PLAN = "sweep.yaml"  # the grid as given: base, axes, seeds and run ids in grid order


@dataclass(frozen=True)
class Run:
    run_id: str
    config: TrainConfig


@dataclass
class SweepResult:
    out: Path
    runs: list[Run]
    statuses: dict[str, str] = field(default_factory=dict)  # run id -> status
    skipped: list[str] = field(default_factory=list)  # run ids already finished before this sweep

    @property
    def failed(self) -> list[str]:
        return [run_id for run_id, status in self.statuses.items() if status == "failed"]


def _slug_value(value: Any) -> str:
    text = str(value)
    text = text.replace(":", "_").replace(",", "_").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._=+\-]", "", text)


def run_id(point: Mapping[str, Any], seed: int) -> str:
    """A readable slug of the varied fields: ``init=kaiming_normal_mode=fan_out-seed=0``."""
    parts = [f"{name}={_slug_value(value)}" for name, value in point.items()]
    return "-".join([*parts, f"seed={seed}"])


def expand(
    base: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], seeds: Sequence[int], out: str | Path
) -> list[Run]:
    """Every combination of the grid's values (in the order given) times every seed, all checked."""
    out = Path(out)
    if not seeds:
        raise SpecError("--seeds needs at least one seed")
    names = list(grid)
    for name in names:
        if not grid[name]:
            raise SpecError(f"--{name.replace('_', '-')} has an empty list of values")
    base_config = config_from_dict(dict(base))
    runs: list[Run] = []
    seen: dict[str, Mapping[str, Any]] = {}
    for values in itertools.product(*(grid[n] for n in names)):
        point = dict(zip(names, values))
        for seed in seeds:
            rid = run_id(point, seed)
            if rid in seen:  # two values that slug alike: keep both, apart
                rid += "-" + hashlib.sha1(repr(sorted(point.items())).encode()).hexdigest()[:6]
            seen[rid] = point
            cfg = config_from_dict({**point, "seed": seed, "out": str(out / rid)}, base_config)
            runs.append(Run(rid, cfg))
    preflight([run.config for run in runs])
    return runs


def run_status(run_dir: Path) -> str | None:
    """The status in a run directory's summary.json, or None if it has not ended."""
    import json

    summary = run_dir / SUMMARY_FILE
    if not summary.is_file():
        return None
    try:
        return json.loads(summary.read_text()).get("status")
    except (OSError, ValueError):
        return None


def _prepared(run: Run) -> TrainConfig:
    """Resume a run that has started (any file in its directory), start a fresh one otherwise."""
    out = Path(run.config.out)
    started = out.is_dir() and any(out.iterdir())
    return config_from_dict({"resume": started}, run.config)


def _execute(cfg_dict: dict[str, Any]) -> tuple[str, str]:
    from .train import train

    cfg = config_from_dict(cfg_dict)
    try:
        result = train(cfg)
    except SpecError as exc:  # e.g. a dataset that went missing mid-sweep
        log.error("run %s: %s", cfg.out, exc)
        return cfg.out, "failed"
    return cfg.out, result.status


# --- worker processes ---------------------------------------------------------------

_WORKER_DEVICE: str | None = None


def _init_worker(devices: Any, threads: int) -> None:
    """Give each worker one device from the shared queue and a fair share of CPU threads."""
    global _WORKER_DEVICE
    torch.set_num_threads(threads)
    _WORKER_DEVICE = devices.get() if devices is not None else None
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def _execute_in_worker(cfg_dict: dict[str, Any]) -> tuple[str, str]:
    if _WORKER_DEVICE is not None and cfg_dict.get("device") in ("auto", "cuda"):
        cfg_dict = {**cfg_dict, "device": _WORKER_DEVICE}
    return _execute(cfg_dict)


def run_local(configs: list[TrainConfig], jobs: int, on_done: Callable[[str, str], None]) -> None:
    """Run configs in this process (jobs=1) or in ``jobs`` persistent worker processes."""
    if jobs <= 1:
        for cfg in configs:
            on_done(*_execute(cfg.to_dict()))
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ctx = multiprocessing.get_context("spawn")  # CUDA and fork do not mix
    devices = None
    if gpus > 1:
        devices = ctx.Manager().Queue()
        for i in range(jobs):
            devices.put(f"cuda:{i % gpus}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(devices, threads)
    ) as pool:
        futures = [pool.submit(_execute_in_worker, cfg.to_dict()) for cfg in configs]
        for future in concurrent.futures.as_completed(futures):
            on_done(*future.result())


def _execute_chunk(cfg_dicts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One submitted job: several runs in one process, so start-up is paid once per job."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return [_execute(cfg_dict) for cfg_dict in cfg_dicts]


# Executor parameters for submitit: generous limits a user overrides with
# --launcher-option (e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=600).
SUBMITIT_DEFAULTS = {"timeout_min": 24 * 60, "name": "reslab-sweep"}


def run_submitit(configs: list[TrainConfig], jobs: int, on_done: Callable[[str, str], None],
                 options: Mapping[str, Any] | None = None) -> None:
    """Submit the runs as ``jobs`` jobs through submitit: Slurm where ``srun`` exists, local processes otherwise."""
    try:
        import submitit
    except ImportError:
        raise SpecError("--launcher submitit needs the submitit package: pip install 'reslab[slurm]'") from None
    if not configs:
        return
    folder = Path(configs[0].out).parent / ".submitit"
    executor = submitit.AutoExecutor(folder=folder)
    try:
        executor.update_parameters(**{**SUBMITIT_DEFAULTS, **(options or {})})
    except (TypeError, ValueError) as exc:
        raise SpecError(f"bad --launcher-option for submitit: {exc}") from None
    chunks = [[cfg.to_dict() for cfg in configs[i::jobs]] for i in range(min(jobs, len(configs)))]
    submitted = executor.map_array(_execute_chunk, chunks)
    log.info("submitted %d job(s) to %s (logs in %s)", len(submitted), executor.cluster, folder)
    for job in submitted:
        try:
            results = job.result()
        except Exception as exc:  # noqa: BLE001 - a lost job fails its runs, not the sweep
            log.error("job %s failed: %s", job.job_id, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            continue
        for run_out, status in results:
            on_done(run_out, status)


LAUNCHERS: dict[str, Callable[..., None]] = {"local": run_local, "submitit": run_submitit}


def sweep(
    base: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    *,
    seeds: Sequence[int] = (0,),
    out: str | Path = "sweeps/sweep",
    jobs: int = 1,
    launcher: str = "local",
    launcher_options: Mapping[str, Any] | None = None,
    write_report: bool = True,
) -> SweepResult:
    """Run the grid ``base x grid x seeds`` into ``out``; see the module docstring."""
    if jobs < 1:
        raise SpecError(f"--jobs must be at least 1, got {jobs}")
    if launcher not in LAUNCHERS:
        raise SpecError(f"unknown --launcher {launcher!r}; valid choices: {', '.join(LAUNCHERS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {str(out)!r} is a file, not a directory")
    runs = expand(base, grid, seeds, out)
    result = SweepResult(out=out, runs=runs)
    todo: list[TrainConfig] = []
    for run in runs:
        status = run_status(Path(run.config.out))
        if status in FINISHED:
            result.statuses[run.run_id] = status
            result.skipped.append(run.run_id)
        else:
            todo.append(_prepared(run))
    log.info("sweep %s: %d runs, %d finished already, %d to run", out, len(runs), len(result.skipped), len(todo))
    out.mkdir(parents=True, exist_ok=True)
    plan = {"base": dict(base), "grid": {k: list(v) for k, v in grid.items()}, "seeds": list(seeds),
            "runs": [run.run_id for run in runs]}
    atomic_write_text(out / SWEEP_PLAN, yaml.safe_dump(plan, sort_keys=False))
    by_out = {run.config.out: run.run_id for run in runs}

    def on_done(run_out: str, status: str) -> None:
        result.statuses[by_out[run_out]] = status
        log.info("[%d/%d] %s: %s", len(result.statuses), len(runs), by_out[run_out], status)

    if launcher == "local":
        if launcher_options:
            raise SpecError("--launcher-option applies to --launcher submitit only")
        run_local(todo, jobs, on_done)
    else:
        LAUNCHERS[launcher](todo, jobs, on_done, launcher_options)
    for run in runs:  # a run whose job was lost counts as failed
        if run.run_id not in result.statuses:
            result.statuses[run.run_id] = run_status(Path(run.config.out)) or "failed"
    if write_report:
        from .report import report

        report(out)
    return result
