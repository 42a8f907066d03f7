"""Sweeps: a grid of training configs run into ``OUT/<run-id>/``.

- Every grid point is checked before anything runs, so a bad value anywhere in
  the grid is bad input (exit 2) with nothing written.
- A run directory already there is reused only if the ``config.yaml`` saved in
  it asks for the same run as the grid does now (fields that only say where or
  how a run executes, :data:`reslab.config.EXECUTION_FIELDS`, may differ).  If
  any run was made with other settings the sweep stops before any work, naming
  the run and the fields; ``restart=True`` (``--restart``) deletes exactly the
  runs whose settings differ and runs them again, keeping those that match.
- Reused runs that have finished (a ``summary.json`` with status completed or
  diverged) are skipped and partial ones resumed from their checkpoint, so
  rerunning a sweep after a crash completes each run exactly once and rerunning
  a finished sweep is a quick no-op.
- Runs execute in this process (``jobs=1``) or in ``jobs`` long-lived worker
  processes (one per GPU where there are several, each bound to its own
  device), never one fresh Python per run.  A diverged or failed run does not
  stop the sweep, and neither does an exception (e.g. CUDA out of memory) while
  a run is being built: it is recorded as that run's failure.
- Run directories below ``out`` whose ids are not in the grid are not part of
  the sweep: they are left alone.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import hashlib
import itertools
import logging
import multiprocessing
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, config_from_dict, describe_differences, differing_fields
from .errors import SpecError
from .fileio import atomic_write_json, require_writable_dir
from .rundir import CONFIG_FILE, Run, RunDir, UnreadableRecord, run_numbers, run_status, write_sweep_plan
from .sources import model_change
from .training import check_config, preflight

log = logging.getLogger(__name__)

FINISHED = ("completed", "diverged")


@dataclass
class SweepResult:
    out: Path
    runs: list[Run]  # in grid order; each with its summary once the sweep has ended (None: it never ended)
    statuses: dict[str, str] = field(default_factory=dict)  # run id -> status
    skipped: list[str] = field(default_factory=list)  # run ids already finished before this sweep
    restarted: list[str] = field(default_factory=list)  # run ids deleted and run again (restart=True)

    @property
    def failed(self) -> list[str]:
        return [run_id for run_id, status in self.statuses.items() if status == "failed"]


def _slug_value(value: Any) -> str:
    if isinstance(value, Mapping):  # an init policy: conv_kaiming_normal_mode=fan_out+linear_normal_std=0.01
        return "+".join(f"{_slug_value(k)}_{_slug_value(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    text = text.replace(":", "_").replace(",", "_").replace("/", "_")
    return re.sub(r"[^A-Za-z0-9._=+\-]", "", text)


def run_id(point: Mapping[str, Any], seed: int) -> str:
    """A readable slug of the varied fields: ``init=kaiming_normal_mode=fan_out-seed=0``.

    A policy mapping reads as its entries joined by ``+``:
    ``init=conv_kaiming_normal_mode=fan_out+linear_normal_std=0.01-seed=0``.
    """
    parts = [f"{name}={_slug_value(value)}" for name, value in point.items()]
    return "-".join([*parts, f"seed={seed}"])


GridSpec = Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Sequence[Any]]]


def grid_list(grid: GridSpec) -> list[Mapping[str, Sequence[Any]]]:
    """A grid as a list of cross products: a mapping is one, a list of mappings their union."""
    return [grid] if isinstance(grid, Mapping) else list(grid)


def expand(base: Mapping[str, Any], grid: GridSpec, seeds: Sequence[int], out: str | Path) -> list[Run]:
    """Every combination of the grid's values (in the order given) times every seed, all checked:
    one planned :class:`~reslab.rundir.Run` each (its config, its directory ``out/<run-id>``, no summary).

    ``grid`` is a mapping of axes, or a list of them: the union of their points, each once.
    """
    runs = _grid_runs(base, grid, seeds, out)
    preflight([run.config for run in runs])
    return runs


def _grid_runs(base: Mapping[str, Any], grid: GridSpec, seeds: Sequence[int], out: str | Path) -> list[Run]:
    """:func:`expand` without the preflight: every value typed and its specs checked, no data loaded."""
    out = Path(out)
    if not seeds:
        raise SpecError("--seeds needs at least one seed")
    base_config = config_from_dict(dict(base))
    runs: list[Run] = []
    seen: dict[str, Mapping[str, Any]] = {}
    for one in grid_list(grid):
        names = list(one)
        for name in names:
            if not one[name]:
                raise SpecError(f"--{name.replace('_', '-')} has an empty list of values")
        for values in itertools.product(*(one[n] for n in names)):
            point = dict(zip(names, values, strict=True))
            for seed in seeds:
                rid = run_id(point, seed)
                if rid in seen and seen[rid] == point:  # the same point from two parts of a union: once
                    continue
                if rid in seen:  # two values that slug alike: keep both, apart
                    rid += "-" + hashlib.sha1(repr(sorted(point.items())).encode()).hexdigest()[:6]
                seen[rid] = point
                cfg = config_from_dict({**point, "seed": seed, "out": str(out / rid)}, base_config)
                runs.append(Run(path=out / rid, config=cfg))
    for run in runs:  # a bad spec anywhere is reported before any dataset is loaded (or downloaded)
        check_config(run.config)
    return runs


def _saved_config_difference(run: Run) -> str | None:
    """Why the directory of ``run`` holds another run than the one asked for; None if it may be reused.

    Reusable: no directory, an empty one, or a ``config.yaml`` that differs from
    the requested config in execution fields at most.
    """
    if not run.path.exists():
        return None
    if not run.path.is_dir():
        return "is a file, not a run directory"
    run_dir = RunDir(run.path)
    if not run_dir.is_run():
        return None if not run_dir.holds_files() else f"holds files but no {CONFIG_FILE}"
    try:
        saved = run_dir.read_config()
    except UnreadableRecord as exc:
        return f"has an unreadable {CONFIG_FILE} ({exc.reason})"
    names = differing_fields(saved, run.config)
    if names:
        return f"was trained with other settings ({describe_differences(saved, run.config, names)})"
    changed = model_change(run.path)
    return None if changed is None else f"was trained with other code: {changed}"


def stale_runs(runs: Sequence[Run]) -> list[tuple[Run, str]]:
    """The runs whose directories hold another run than the one asked for, each with the reason."""
    stale = []
    for run in runs:
        reason = _saved_config_difference(run)
        if reason is not None:
            stale.append((run, reason))
    return stale


def _stale_error(out: Path, stale: list[tuple[Run, str]]) -> SpecError:
    run, reason = stale[0]
    others = len(stale) - 1
    more = f", and {others} other run{'s' if others != 1 else ''} in it differ{'s' if others == 1 else ''} too" \
        if others else ""
    return SpecError(
        f"run {run.run_id!r} in {str(out)!r} {reason}{more}; pass --restart to delete and rerun the runs whose "
        f"settings differ (runs that match are kept), or choose another --out"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prepared(run: Run) -> TrainConfig:
    """Resume a run that has started (any file in its directory), start a fresh one otherwise."""
    return config_from_dict({"resume": RunDir(run.path).holds_files()}, run.config)


@contextlib.contextmanager
def _run_output(cfg: TrainConfig) -> Iterator[str | None]:
    """How a run inside a sweep shows itself: with ``--progress auto`` (the default), its
    data line and one line per epoch under ``--verbose`` and nothing but warnings
    otherwise (the sweep prints a line per finished run); any other --progress as asked."""
    if cfg.progress != "auto":
        yield None
        return
    if log.isEnabledFor(logging.DEBUG):
        yield "log"
        return
    run_log = logging.getLogger("reslab.training")
    level = run_log.level
    run_log.setLevel(logging.WARNING)
    try:
        yield "none"
    finally:
        run_log.setLevel(level)


def _execute(cfg_dict: dict[str, Any]) -> tuple[str, str]:
    from .training import train

    cfg = config_from_dict(cfg_dict)
    error = None
    try:
        with _run_output(cfg) as progress:
            return cfg.out, train(cfg, progress=progress).status
    except SpecError as exc:  # e.g. a dataset that went missing mid-sweep
        log.error("run %s: %s", cfg.out, exc)
        return cfg.out, "failed"
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory while building the run: it fails, the sweep goes on
        error = f"{type(exc).__name__}: {exc}"
    # Outside the handler, so the exception and the tensors its traceback holds are gone.
    _release_memory()
    log.error("run %s failed: %s", cfg.out, error.splitlines()[0])
    _record_failure(cfg, error)
    return cfg.out, "failed"


def _release_memory() -> None:
    """Hand what a broken run left behind back, so the next run starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_failure(cfg: TrainConfig, error: str) -> None:
    """A failed run's record for a run that broke before its loop could write one.

    The ``config.yaml`` (written only if absent) lets the report list the run and
    the next sweep check it against the grid and retry it in place.
    """
    run_dir = RunDir(cfg.out)
    summary = {"status": "failed", "epochs_completed": 0, "epochs": cfg.epochs, "final_eval_acc": None,
               "error": error}
    try:
        if not run_dir.is_run():
            run_dir.write_config(cfg)
        run_dir.write_summary(summary)
    except OSError as exc:
        log.warning("run %s: could not record the failure (%s)", cfg.out, exc)


# --- worker processes ---------------------------------------------------------------

_WORKER_DEVICE: str | None = None


def configure_worker_logging(level: int = logging.INFO) -> None:
    """Log reslab's messages to stderr in a worker process: only the ``reslab`` logger
    (not the root logger, which belongs to whatever hosts the worker), one handler however
    often this is called, and no propagation, so no line is printed twice."""
    logger = logging.getLogger("reslab")
    logger.setLevel(level)
    if not any(getattr(h, "_reslab_worker", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._reslab_worker = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def worker_devices(jobs: int, gpus: int) -> list[str] | None:
    """The device of each of ``jobs`` workers: round-robin over the GPUs where there are
    several, None (every run on its config's device) otherwise."""
    return [f"cuda:{i % gpus}" for i in range(jobs)] if gpus > 1 else None


def _bind_device(device: str) -> None:
    """Make ``device`` this process's current CUDA device, so whatever uses the current
    device (cuDNN handles, NCCL, ``get_device_name()``, ``empty_cache``) uses this one."""
    if device.startswith("cuda:") and int(device.partition(":")[2]) < torch.cuda.device_count():
        torch.cuda.set_device(device)  # (an index past the last GPU is left to train() to report)


def _init_worker(devices: Any, threads: int, level: int = logging.INFO) -> None:
    """Give each worker one device from the shared queue, bound as its current device, and
    a fair share of CPU threads."""
    global _WORKER_DEVICE
    configure_worker_logging(level)
    torch.set_num_threads(threads)
    _WORKER_DEVICE = devices.get() if devices is not None else None
    if _WORKER_DEVICE is not None:
        _bind_device(_WORKER_DEVICE)


def _execute_in_worker(cfg_dict: dict[str, Any]) -> tuple[str, str]:
    """Run one config on the worker's device; an explicit ``cuda:N`` (or ``cpu``) stays as given."""
    if _WORKER_DEVICE is not None:
        if cfg_dict.get("device") in ("auto", "cuda"):
            cfg_dict = {**cfg_dict, "device": _WORKER_DEVICE}
        # Bind for this run: the worker's device, or the config's own cuda:N.
        _bind_device(str(cfg_dict.get("device")))
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
    assigned = worker_devices(jobs, gpus)
    if assigned is not None:
        devices = ctx.Manager().Queue()
        for device in assigned:
            devices.put(device)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    level = logging.getLogger("reslab").getEffectiveLevel()
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(devices, threads, level)
    ) as pool:
        futures = [pool.submit(_execute_in_worker, cfg.to_dict()) for cfg in configs]
        for future in concurrent.futures.as_completed(futures):
            on_done(*future.result())


def _execute_chunk(cfg_dicts: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """One submitted job: several runs in one process, so start-up is paid once per job."""
    configure_worker_logging()
    return [_execute(cfg_dict) for cfg_dict in cfg_dicts]


# Executor parameters for submitit: generous limits a user overrides with
# --launcher-option (e.g. slurm_partition=gpu, gpus_per_node=1, timeout_min=600).
SUBMITIT_DEFAULTS = {"timeout_min": 24 * 60, "name": "reslab-sweep"}


def _submitit():
    try:
        import submitit
    except ImportError:
        raise SpecError("--launcher submitit needs the submitit package: pip install 'reslab[slurm]'") from None
    return submitit


def run_submitit(configs: list[TrainConfig], jobs: int, on_done: Callable[[str, str], None],
                 options: Mapping[str, Any] | None = None) -> None:
    """Submit the runs as ``jobs`` jobs through submitit: Slurm where ``srun`` exists, local processes otherwise."""
    submitit = _submitit()
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


@contextlib.contextmanager
def _sweep_bar(total: int) -> Iterator[Callable[[], None]]:
    """One progress bar for the whole sweep on a terminal or in a notebook (runs done of
    ``total``, elapsed, time left), with the per-run lines printed above it; nothing extra
    elsewhere, or with ``--verbose``, where each run prints its own epoch lines."""
    from .training import shows_bars

    if not (total and shows_bars() and not log.isEnabledFor(logging.DEBUG)):
        yield lambda: None
        return
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm(loggers=[logging.getLogger("reslab")]), \
            tqdm(total=total, unit="run", desc="sweep", dynamic_ncols=True, leave=False) as bar:
        yield lambda: bar.update(1)


def sweep(
    base: Mapping[str, Any],
    grid: GridSpec,
    *,
    seeds: Sequence[int] = (0,),
    out: str | Path = "sweeps/sweep",
    jobs: int = 1,
    launcher: str = "local",
    launcher_options: Mapping[str, Any] | None = None,
    write_report: bool = True,
    restart: bool = False,
) -> SweepResult:
    """Run the grid ``base x grid x seeds`` into ``out``; see the module docstring.

    Everything is checked before any work: the grid, the launcher, and every run
    directory already in ``out`` against the config now asked for.  A run made
    with other settings is a SpecError unless ``restart``, which deletes exactly
    those runs (and only once every check has passed) and runs them again; runs
    whose settings match are reused as they are, restart or not.
    """
    _check_launcher(jobs, launcher, launcher_options)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpecError(f"--out {str(out)!r} is a file, not a directory")
    require_writable_dir(out, "--out")
    runs = _grid_runs(base, grid, seeds, out)
    stale = stale_runs(runs)
    if stale and not restart:  # before the preflight: refused at once, with no dataset loaded (or downloaded)
        raise _stale_error(out, stale)
    preflight([run.config for run in runs])
    result = SweepResult(out=out, runs=runs)
    for run, reason in stale:  # every check has passed: only now is anything deleted
        log.info("restarting %s: it %s", run.run_id, reason)
        _remove(run.path)
        result.restarted.append(run.run_id)
    todo = _runs_to_do(result)
    log.info("sweep %s: %d runs, %d finished already, %d to run%s", out, len(runs), len(result.skipped), len(todo),
             f" ({len(result.restarted)} restarted)" if result.restarted else "")
    grids = [{k: list(v) for k, v in one.items()} for one in grid_list(grid)]
    write_sweep_plan(out, {"base": dict(base), "grid": grids[0] if isinstance(grid, Mapping) else grids,
                           "seeds": list(seeds), "runs": [run.run_id for run in runs]})
    _launch(result, todo, jobs, launcher, launcher_options)
    for run in runs:  # each run's record as the sweep leaves it; one whose job was lost counts as failed
        run.summary = RunDir(run.path).read_summary()
        result.statuses.setdefault(run.run_id, run.status if run.summary is not None else "failed")
    if write_report:
        from .reporting import report

        report(out)
    return result


def _check_launcher(jobs: int, launcher: str, launcher_options: Mapping[str, Any] | None) -> None:
    """A one-line SpecError for a bad ``--jobs``, ``--launcher`` or ``--launcher-option``."""
    if jobs < 1:
        raise SpecError(f"--jobs must be at least 1, got {jobs}")
    if launcher not in LAUNCHERS:
        raise SpecError(f"unknown --launcher {launcher!r}; valid choices: {', '.join(LAUNCHERS)}")
    if launcher == "local" and launcher_options:
        raise SpecError("--launcher-option applies to --launcher submitit only")
    if launcher == "submitit":
        _submitit()


def _runs_to_do(result: SweepResult) -> list[TrainConfig]:
    """The configs of the runs that have not finished (resumed where they started); the
    finished ones are recorded in ``result`` as skipped."""
    todo: list[TrainConfig] = []
    for run in result.runs:
        status = run_status(run.path)
        if status in FINISHED:
            result.statuses[run.run_id] = status
            result.skipped.append(run.run_id)
        else:
            todo.append(_prepared(run))
    return todo


def _launch(result: SweepResult, todo: list[TrainConfig], jobs: int, launcher: str,
            launcher_options: Mapping[str, Any] | None) -> None:
    """Run ``todo`` through the launcher, recording each run's status in ``result`` (and a line
    with its numbers) as it ends."""
    by_out = {run.config.out: run.run_id for run in result.runs}
    with _sweep_bar(len(todo)) as advance:
        def on_done(run_out: str, status: str) -> None:
            result.statuses[by_out[run_out]] = status
            log.info("[%d/%d] %s: %s%s", len(result.statuses), len(result.runs), by_out[run_out], status,
                     run_numbers(Path(run_out)))
            advance()

        if launcher == "local":
            run_local(todo, jobs, on_done)
        else:
            LAUNCHERS[launcher](todo, jobs, on_done, launcher_options)


@dataclass
class StudyResult:
    """What :func:`study` ran and judged: the study as planned, its sweep and its report."""

    study: Any  # reslab.studies.Study, with the overrides it ran with
    sweep: SweepResult
    report: Any  # reslab.reporting.Report; its ``verdict`` is the study's
    seconds: float = 0.0  # wall time of the whole study: sweep, measurements and report

    @property
    def verdict(self) -> Any:
        """The claim judged from the runs (``.verdict`` is supported, not supported or inconclusive)."""
        return self.report.verdict


def study(
    name: Any,
    *,
    out: str | Path | None = None,
    base: Mapping[str, Any] | None = None,
    grid: Mapping[str, Sequence[Any]] | None = None,
    seeds: Sequence[int] | None = None,
    confidence: float | None = None,
    jobs: int | None = None,
    launcher: str = "local",
    launcher_options: Mapping[str, Any] | None = None,
    restart: bool = False,
    quiet: bool = False,
) -> StudyResult:
    """Run a study as ``reslab study`` does and judge its claim from its runs.

    ``name``: a shipped study (``reslab list studies``), a study YAML file, or a
    :class:`reslab.studies.Study` already loaded.  ``base`` / ``grid`` / ``seeds`` override the study's (see
    :func:`reslab.studies.plan_study`), ``confidence`` its confidence; ``jobs`` defaults to the study's own;
    ``out`` to ``studies/NAME``.  Writes the runs, ``study.yaml`` (the study as it
    ran), its measurements, the report and ``verdict.json`` into ``out``; returns a
    :class:`StudyResult` whose ``verdict`` says whether the claim held.  Seeds added
    to a finished study reuse the runs it already has.  Unless ``quiet``, it shows a bar
    over its runs on a terminal or in a notebook, then prints the report's table and the
    verdict with the numbers that decided it.
    """
    import time

    from .reporting import report
    from .studies import Study, get_study, plan_study, write_study
    from .verdict import check_confidence

    started = time.perf_counter()
    found = name if isinstance(name, Study) else get_study(str(name))
    planned = plan_study(found, base, grid, seeds)
    if confidence is not None:
        planned = replace(planned, confidence=check_confidence(confidence, "--confidence"))
    result = sweep(planned.base, planned.grid, seeds=planned.seeds, out=out or f"studies/{found.name}",
                   jobs=found.jobs if jobs is None else jobs, launcher=launcher,
                   launcher_options=launcher_options, write_report=False, restart=restart)
    # The study as it ran goes beside its runs: the report, now and whenever `reslab report`
    # reads the directory again, judges the claim from them.
    write_study(planned, result.out)
    if planned.measure:
        _measure(planned, result)
    judged = report(result.out)
    if not quiet:
        print(judged.format_table(), end="\n\n")
        if judged.verdict is not None:
            print("\n".join(judged.verdict.format_lines()))
    return StudyResult(study=planned, sweep=result, report=judged, seconds=time.perf_counter() - started)


def _measure(planned: Any, result: SweepResult) -> None:
    """The study's measurements of its finished runs, into ``measurements.json`` for the report."""
    from .measure import run_measurements
    from .studies import MEASUREMENTS_FILE

    atomic_write_json(result.out / MEASUREMENTS_FILE, run_measurements(result.out, planned.measure, result.runs))
