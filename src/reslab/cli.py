"""The ``reslab`` command line: ``reslab list | inspect | ...``.

Every command accepts ``--config FILE.yaml`` (values for its options, keys
spelled as the flags are, with ``-`` or ``_``) and ``--print-config`` (print the
resolved options as YAML and exit).  Bad input of any kind ends in one line on
stderr and exit code 2; a failed run exits 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .config import load_config_file, parse_key_values
from .errors import SpecError
from .fileio import require_writable_dir

log = logging.getLogger("reslab")

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(SpecError):
    """Bad command-line usage (argparse's own complaints end up here)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as a UsageError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> NoReturn:
        where = self.prog.removeprefix("reslab").strip()
        raise UsageError(f"{where}: {message}" if where else message)


# --- commands ---------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    help: str
    # the resolved options --print-config shows (default: the parsed flags)
    resolve: Callable[[argparse.Namespace], dict[str, Any]] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
            resolve: Callable[[argparse.Namespace], dict[str, Any]] | None = None):
    """Register ``reslab NAME``: decorate ``run(args) -> exit code``; ``add_arguments`` fills its parser."""

    def decorate(run):
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is already registered")
        COMMANDS[name] = Command(add_arguments, run, help, resolve)
        return run

    return decorate


def _add_list_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=_list_sources(), help="which registry to list")
    parser.add_argument("--all", action="store_true",
                        help="with models: also every torchvision classification model, as tv:NAME")


def _list_sources() -> dict[str, Callable[[], dict[str, str]]]:
    from .convs import list_convs
    from .datasets import list_datasets
    from .inits import list_inits
    from .models import list_models
    from .norms import list_norms
    from .optim import list_optimizers, list_schedules
    from .studies import list_studies

    def models() -> dict[str, str]:
        return {**list_models(), "tv:NAME": "any torchvision classification model (`reslab list models --all` "
                                            "lists them)"}

    return {"models": models, "norms": list_norms, "convs": list_convs, "inits": list_inits,
            "datasets": list_datasets, "schedules": list_schedules, "optimizers": list_optimizers,
            "studies": list_studies}


@command("list", "list the models, norms, conv options, init schemes, datasets, schedules, optimizers or studies "
                 "reslab knows",
         _add_list_arguments)
def run_list(args: argparse.Namespace) -> int:
    if args.all and args.what != "models":
        raise UsageError(f"list: --all applies to `reslab list models`, not to {args.what}")
    if args.all:
        from .models import list_models

        entries = list_models(torchvision=True)
    else:
        entries = _list_sources()[args.what]()
    width = max(len(name) for name in entries)
    for name, description in entries.items():
        print(f"{name.ljust(width)}  {description}")
    return EXIT_OK



def add_model_flags(parser: argparse.ArgumentParser, *, skip: Sequence[str] = ()) -> None:
    """The flags that say which model to build and how (``--norm``, ``--conv``, ``--init``, ``--stem``,
    ``--shortcut``, ``--zero-init-residual``, ``-o KEY=VALUE``): the same as ``reslab train``'s, from
    the same config fields.  The model itself is the command's positional argument."""
    from .build import MODEL_FIELDS
    from .config import TrainConfig

    by_name = {f.name: f for f in fields(TrainConfig)}
    parser.add_argument("model", help="model name (see `reslab list models`), tv:NAME for a torchvision model, or "
                                      "your own: path/to/file.py:Name or py:package.module:Name")
    for name in MODEL_FIELDS:
        if name != "model" and name not in skip:
            _add_field_flag(parser, by_name[name], as_lists=False)


def model_config_from_args(args: argparse.Namespace, **fields: Any):
    """The config the model flags in ``args`` describe (every other field at its default)."""
    from .build import MODEL_FIELDS, model_config

    given = {name: getattr(args, name) for name in MODEL_FIELDS[1:] if hasattr(args, name)}
    return model_config(args.model, **{**given, **fields})


def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_flags(parser)
    parser.add_argument("--num-classes", type=int, default=10, help="size of the classifier output")
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (default: the model's)")
    parser.add_argument("--input-size", type=int, default=None, help="input height = width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for the initialization; lsuv runs on a batch of 64 N(0,1) images of the input "
                             "shape drawn from it")
    parser.add_argument("--plot", default=None, metavar="PNG", help="also save predicted vs measured std per tensor")


LSUV_INSPECT_BATCH = 64  # images of noise `reslab inspect --init lsuv` calibrates on


@command("inspect", "parameters, MACs per image and the per-tensor init report of a model", _add_inspect_arguments)
def run_inspect(args: argparse.Namespace) -> int:
    import torch

    from .build import build, init_model
    from .diagnose import count_macs, count_params, human_count
    from .inits import needs_batch
    from .models import model_input
    from .norms import describe_norm_layers

    if args.plot:
        require_writable_dir(Path(args.plot).parent, "--plot", repr(args.plot))
    cfg = model_config_from_args(args, seed=args.seed)
    channels, size = model_input(cfg.model)
    channels = args.in_channels or channels
    size = args.input_size or size
    model = build(cfg, num_classes=args.num_classes, in_channels=channels, input_size=size)
    batch = None
    if needs_batch(cfg.init):
        gen = torch.Generator().manual_seed(args.seed)
        batch = torch.randn(LSUV_INSPECT_BATCH, channels, size, size, generator=gen)
    report = init_model(model, cfg, batch=batch)
    params = count_params(model)
    macs = count_macs(model, (channels, size, size))
    print(f"model       {cfg.model}  norm={cfg.norm}  init={cfg.init}"
          + (f"  conv={cfg.conv}" if cfg.conv != "default" else ""))
    print(f"input       {channels}x{size}x{size}, {args.num_classes} classes")
    print(f"parameters  {params:,} ({human_count(params)})")
    print(f"MACs/image  {macs:,} ({human_count(macs)})")
    norm_lines = describe_norm_layers(model) or ["none"]
    for i, line in enumerate(norm_lines):
        print(f"{'norm layers' if i == 0 else '':<12}{line}")
    print()
    print(report.format_table())
    if args.plot:
        from .plots import plot_init_report

        path = plot_init_report(report, args.plot, title=f"{cfg.model} ({cfg.norm}, {cfg.init})")
        print(f"\nplot: {path}")
    return EXIT_OK


# --- train ----------------------------------------------------------------------


class _KeyValues(argparse.Action):
    """``-o KEY=VALUE`` (repeatable): the pairs gathered into one mapping, later ones winning."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = dict(getattr(namespace, self.dest, None) or {})
        try:
            current.update(parse_key_values([values], "model option"))
        except SpecError as exc:
            raise UsageError(str(exc)) from None
        setattr(namespace, self.dest, current)


def _add_field_flag(parser: argparse.ArgumentParser, f, *, as_lists: bool) -> None:
    """The flag of one TrainConfig field (``batch_size`` -> ``--batch-size``); values stay strings
    until ``config_from_dict`` types them."""
    from .config import field_type

    help_text = f.metadata.get("help", "")
    if f.metadata.get("choices"):
        help_text += f" ({', '.join(f.metadata['choices'])})"
    default_text = "" if f.default is None or f.default is dataclasses.MISSING else f"; default {f.default}"
    flag_name = "--" + f.name.replace("_", "-")
    if f.metadata.get("key_values"):  # -o KEY=VALUE, the same in every command
        parser.add_argument(*f.metadata["flags"], dest=f.name, action=_KeyValues, default=argparse.SUPPRESS,
                            metavar="KEY=VALUE", help=help_text)
    elif field_type(f) is bool and not as_lists:
        parser.add_argument(flag_name, dest=f.name, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text + default_text)
    elif f.metadata.get("switch") and not as_lists:  # --channels-last [auto|on|off], --no-channels-last
        parser.add_argument(flag_name, dest=f.name, nargs="?", const="on", default=argparse.SUPPRESS,
                            metavar="|".join(f.metadata["choices"]), help=help_text + default_text)
        parser.add_argument("--no-" + flag_name[2:], dest=f.name, action="store_const", const="off",
                            default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    else:
        metavar = "V[,V...]" if as_lists else f.name.upper()
        parser.add_argument(flag_name, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                            help=help_text + default_text)


def add_config_flags(parser: argparse.ArgumentParser, *, as_lists: bool = False) -> None:
    """One flag per TrainConfig field; with ``as_lists`` (sweeps) each takes a comma list."""
    from .config import TrainConfig

    for f in fields(TrainConfig):
        if as_lists and f.name in ("resume", "out"):
            continue  # sweeps resume partial runs by themselves and name their own --out
        _add_field_flag(parser, f, as_lists=as_lists)


def train_config_from_args(args: argparse.Namespace):
    from .config import config_from_dict

    values = {k: v for k, v in vars(args).items() if k not in _GLOBAL_DESTS}
    return config_from_dict(values)


def _resolve_train(args: argparse.Namespace) -> dict[str, Any]:
    from .build import check

    cfg = train_config_from_args(args).validate()
    check(cfg)  # the model, norm, conv and init specs, as `reslab train` checks them before it starts
    return cfg.to_dict()


@command("train", "train one model on one dataset into a run directory", add_config_flags, _resolve_train)
def run_train(args: argparse.Namespace) -> int:
    from .training import RunFailed, train

    try:
        result = train(train_config_from_args(args))
    except RunFailed as exc:  # under torchrun: this rank broke, recorded it and aborted the job
        print(f"reslab: run failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if os.environ.get("RANK", "0") != "0":
        return EXIT_FAILED if result.status == "failed" else EXIT_OK  # under torchrun only rank 0 prints
    s = result.summary
    acc = s["final_eval_acc"]
    print(f"{result.status}: {s['epochs_completed']}/{s['epochs']} epochs, "
          f"final {s['eval_split']} acc {acc:.4f}" if acc is not None else f"{result.status}: no epoch completed",
          f"-> {result.out}")
    return EXIT_FAILED if result.status == "failed" else EXIT_OK


# --- sweep, study, report --------------------------------------------------------------

SWEEP_ONLY = ("seeds", "jobs", "launcher", "launcher_option", "out", "restart", "confidence")


def _add_sweep_arguments(parser: argparse.ArgumentParser, *, study: bool = False) -> None:
    if study:
        parser.add_argument("name", help="a shipped study's name (see `reslab list studies`) or a study YAML file")
    add_config_flags(parser, as_lists=True)
    parser.add_argument("--seeds", default=argparse.SUPPRESS, metavar="S[,S...]",
                        help="seeds to repeat every grid point with, a comma list with ranges (0-9, 0,2,5-7)"
                        + ("; default: the study's (finished runs of added seeds' siblings are reused)" if study
                           else "; default 0"))
    if study:
        parser.add_argument("--confidence", type=float, default=argparse.SUPPRESS, metavar="C",
                            help="confidence the claim's checks are judged at, between 0.5 and 1; "
                                 "default: the study's (0.95 unless it says)")
    parser.add_argument("--out", default=argparse.SUPPRESS, metavar="DIR",
                        help="sweep directory: one run directory per grid point and seed"
                        + ("; default studies/NAME" if study else "; default sweeps/sweep"))
    parser.add_argument("--jobs", type=int, default=argparse.SUPPRESS if study else 1,
                        help="runs at once (one per GPU where there are several)"
                        + ("; default: the study's" if study else "; default 1"))
    parser.add_argument("--launcher", default="local",
                        help="where runs execute: local (this machine) or submitit (Slurm, or local processes "
                             "without it)")
    parser.add_argument("--launcher-option", action="append", default=[], metavar="KEY=VALUE",
                        help="submitit executor parameter, e.g. slurm_partition=gpu, gpus_per_node=1 (repeatable)")
    parser.add_argument("--restart", action="store_true",
                        help="delete and rerun the runs in --out that were made with other settings than these "
                             "(runs whose settings match are kept and reused); without it such runs are an error")


def _split_grid(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Flags with one value go to the base config, comma lists become grid axes.

    Values from ``--config FILE.yaml`` need not be strings: a YAML list is a grid
    axis (its items taken as they are), a mapping (an init policy), a number, a
    boolean or null one value.  A string that opens with ``{`` is one policy mapping.
    """
    from .specs import split_nonempty_list

    base: dict[str, Any] = {}
    grid: dict[str, list[Any]] = {}
    for name, value in vars(args).items():
        if name in _GLOBAL_DESTS or name in SWEEP_ONLY or name == "name":
            continue
        if isinstance(value, (list, tuple)):
            grid[name] = list(value)
            continue
        if not isinstance(value, str) or value.strip().startswith("{"):
            base[name] = value
            continue
        values = split_nonempty_list(value, f"--{name.replace('_', '-')}")
        if len(values) == 1:
            base[name] = values[0]
        else:
            grid[name] = values
    return base, grid


def _seeds(text: str) -> list[int]:
    """``--seeds``: integers and ranges ``A-B`` (both ends included), separated by commas."""
    seeds: list[int] = []
    for part in str(text).split(","):
        low, dash, high = part.strip().partition("-")
        try:
            first, last = (int(low), int(high)) if dash and low else (int(part), int(part))
        except ValueError:
            raise UsageError(f"bad value {text!r} for --seeds: expected integers and ranges separated by commas, "
                             "e.g. 0,1,2 or 0-9") from None
        if last < first:
            raise UsageError(f"bad range {part.strip()!r} in --seeds: it runs backwards; write {last}-{first}")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r} repeats a seed")
    return seeds


def _print_verdict(report_obj) -> None:
    """A study's verdict and the numbers that decided it (nothing for a plain sweep)."""
    if report_obj.verdict is not None:
        print("\n".join(report_obj.verdict.format_lines()))
        print()


def _print_sweep_end(result, report_obj) -> int:
    counts: dict[str, int] = {}
    for status in result.statuses.values():
        counts[status] = counts.get(status, 0) + 1
    print(report_obj.format_table())
    print()
    _print_verdict(report_obj)
    print(f"{len(result.runs)} runs ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}; "
          f"{len(result.skipped)} already finished) in {result.out}")
    print("report: " + ", ".join(str(p) for p in report_obj.files))
    return EXIT_FAILED if result.failed else EXIT_OK


@command("sweep", "run a grid of training runs: any train flag takes a comma list", _add_sweep_arguments)
def run_sweep(args: argparse.Namespace) -> int:
    from .reporting import report
    from .sweeps import sweep

    base, grid = _split_grid(args)
    out = getattr(args, "out", None) or "sweeps/sweep"
    result = sweep(base, grid, seeds=_seeds(getattr(args, "seeds", "0")), out=out, jobs=args.jobs,
                   launcher=args.launcher, launcher_options=parse_key_values(args.launcher_option, "launcher option"),
                   write_report=False, restart=args.restart)
    return _print_sweep_end(result, report(result.out))


def _add_study_arguments(parser: argparse.ArgumentParser) -> None:
    _add_sweep_arguments(parser, study=True)


def _study_plan(args: argparse.Namespace):
    from dataclasses import replace

    from .studies import get_study, plan_study
    from .verdict import check_confidence

    if not getattr(args, "name", None):
        raise UsageError("study: name a shipped study (reslab list studies) or a study YAML file")
    study = get_study(args.name)
    base, grid = _split_grid(args)
    planned = plan_study(study, base, grid, _seeds(args.seeds) if hasattr(args, "seeds") else None)
    if hasattr(args, "confidence"):
        planned = replace(planned, confidence=check_confidence(args.confidence, "--confidence"))
    out = getattr(args, "out", None) or f"studies/{study.name}"
    jobs = args.jobs if hasattr(args, "jobs") else study.jobs
    return planned, out, jobs


def _resolve_study(args: argparse.Namespace) -> dict[str, Any]:
    planned, out, jobs = _study_plan(args)
    return {"study": planned.name, "claim": planned.claim, "base": planned.base, "grid": planned.grid,
            "seeds": list(planned.seeds), "confidence": planned.confidence, "out": out, "jobs": jobs}


@command("study", "run a named, documented sweep and report that reproduces a claim", _add_study_arguments,
         _resolve_study)
def run_study(args: argparse.Namespace) -> int:
    from .sweeps import study

    planned, out, jobs = _study_plan(args)  # checked before any work
    print(f"study {planned.name}: {planned.claim}")
    if planned.notes:
        print(f"  {planned.notes}")
    result = study(planned, out=out, jobs=jobs, launcher=args.launcher,
                   launcher_options=parse_key_values(args.launcher_option, "launcher option"), restart=args.restart,
                   quiet=True)  # the command prints the table and verdict itself, with the run counts
    code = _print_sweep_end(result.sweep, result.report)
    budget = f" (its budget: {planned.budget_s:g} s on 2 CPU cores)" if planned.budget_s else ""
    print(f"study {planned.name} took {result.seconds:.0f} s{budget}")
    return code


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a sweep or study directory (run directories below it)")
    parser.add_argument("--group-by", default=None, metavar="FIELD[,FIELD...]",
                        help="config fields to group runs by (default: the fields that vary)")


@command("report", "tables and plots over the runs in a directory: mean and std over seeds", _add_report_arguments)
def run_report(args: argparse.Namespace) -> int:
    from .reporting import report

    group_by = [g.strip().replace("-", "_") for g in args.group_by.split(",")] if args.group_by else None
    result = report(args.directory, group_by=group_by)
    print(result.format_table())
    print()
    _print_verdict(result)
    print("report: " + ", ".join(str(p) for p in result.files))
    return EXIT_OK


def _add_verdict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a study directory (its study.yaml and runs), as reslab study wrote it")
    parser.add_argument("--confidence", type=float, default=None, metavar="C",
                        help="judge the checks at this confidence (between 0.5 and 1); default: the study's")


@command("verdict", "judge a finished study's claim again from its runs, without training", _add_verdict_arguments)
def run_verdict(args: argparse.Namespace) -> int:
    from .reporting import report
    from .studies import STUDY_FILE, read_study
    from .verdict import check_confidence

    directory = Path(args.directory)
    if not directory.is_dir():
        raise UsageError(f"verdict: {args.directory!r} is not a directory")
    if args.confidence is not None:
        check_confidence(args.confidence, "--confidence")
    if read_study(directory) is None:
        raise UsageError(f"verdict: {args.directory!r} holds no {STUDY_FILE}: it is not a study directory "
                         "(reslab study NAME --out DIR makes one; reslab report DIR summarises a plain sweep)")
    result = report(directory, confidence=args.confidence)
    _print_verdict(result)
    print("report: " + ", ".join(str(p) for p in result.files))
    return EXIT_OK


# --- eval -----------------------------------------------------------------------------

def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", help="a run directory (its config.yaml and checkpoint.pt)")
    parser.add_argument("--dataset", default=None, metavar="SPEC",
                        help="take the images from this dataset spec (same image shape and classes; "
                             "default: the run's own dataset)")
    parser.add_argument("--split", default=None, metavar="test|val|train",
                        help="test, val (the images the run held out with --val-split) or train (un-augmented); "
                             "default: the split the run evaluated on")
    parser.add_argument("--eval-batch-size", type=int, default=None, metavar="N",
                        help="batch size for evaluation; default: the run's")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N; default auto")
    parser.add_argument("--out", default=None, metavar="FILE.json", help="also write the numbers to this JSON file")


def _eval_out(out: str | None, directory: str) -> str | None:
    """``--out`` checked before any work: never a directory, never one of the run's own records."""
    from pathlib import Path

    from .rundir import RUN_FILES

    if out is None:
        return None
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out!r} is a directory; name a file, e.g. {str(path / 'eval.json')!r}")
    if path.name in RUN_FILES and path.resolve().parent == Path(directory).resolve():
        raise UsageError(f"--out {out!r} would overwrite the run's own {path.name}; name another file, "
                         "e.g. eval.json")
    return out


@command("eval", "evaluate a run's checkpoint on a split, the way training evaluated it; writes nothing "
         "into the run", _add_eval_arguments)
def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run
    from .fileio import atomic_write_json

    out = _eval_out(args.out, args.directory)
    result = evaluate_run(args.directory, split=args.split, dataset=args.dataset,
                          eval_batch_size=args.eval_batch_size, device=args.device)
    print(f"loss {result.loss:.4f}  acc {result.acc:.4f}  "
          f"({result.images} images, split {result.split}, dataset {result.dataset})")
    if out is not None:
        atomic_write_json(out, result.to_dict())
    return EXIT_OK


# --- signal -----------------------------------------------------------------------

def _add_signal_arguments(parser: argparse.ArgumentParser) -> None:
    from .diagnose import DEFAULT_SIGNAL_BATCH

    add_model_flags(parser, skip=("norm", "init"))
    parser.add_argument("--norm", default="none,bn", metavar="SPEC[,SPEC...]", help="norm specs to compare")
    parser.add_argument("--init", default="kaiming_normal,xavier_normal", metavar="SPEC[,SPEC...]",
                        help="init specs to compare (see `reslab list inits`); fixup, skipinit and nf build "
                             "their residual branches, lsuv calibrates on the batch")
    parser.add_argument("--dataset", default=None, metavar="SPEC",
                        help="take a real, normalized train batch from this dataset "
                             "(default: N(0,1) noise of the model's input shape, random labels)")
    parser.add_argument("--data-dir", default=None, metavar="DIR", help="where datasets live (default $RESLAB_DATA)")
    parser.add_argument("--download", action="store_true", help="fetch a missing torchvision dataset")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_SIGNAL_BATCH, help="images in the batch")
    parser.add_argument("--seed", type=int, default=0, help="seed for the batch, the labels and the weights")
    parser.add_argument("--out", default=None, metavar="DIR", help="where signal.csv and signal.png go; "
                        "default signal/MODEL")


@command("signal", "signal propagation at init: activation and gradient scale per block, per (norm, init)",
         _add_signal_arguments)
def run_signal(args: argparse.Namespace) -> int:
    from .diagnose import format_signal_table, signal_csv, signal_propagation, signal_unit
    from .fileio import atomic_write_text
    from .plots import plot_signal

    cfg = model_config_from_args(args, norm="bn", init="default")  # the norms and inits compared come next
    # the default folder is named after the model, with what a file name cannot hold (tv:NAME's colon) as _
    out = Path(args.out or Path("signal") / "".join(c if c.isalnum() or c in "-_.=" else "_" for c in args.model))
    require_writable_dir(out, "--out")
    # Everything is checked and measured before anything is written.
    rows = signal_propagation(cfg, args.norm, args.init, dataset=args.dataset, data_dir=args.data_dir,
                              download=args.download, batch_size=args.batch_size, seed=args.seed)
    options = {key: value for key, value in vars(cfg).items()
               if key in ("stem", "shortcut") and value is not None} | cfg.model_options
    source = f"{args.dataset} train images" if args.dataset else "N(0,1) noise, random labels"
    csv_path = atomic_write_text(out / "signal.csv", signal_csv(rows))
    png_path = plot_signal(rows, out / "signal.png", xlabel=signal_unit(args.model, options),
                           title=f"{args.model} at init: batch of {args.batch_size} ({source}), seed {args.seed}")
    print(f"signal propagation at init: {args.model}, batch of {args.batch_size} ({source}), "
          f"loss = cross-entropy summed over the batch, seed {args.seed}")
    print()
    print(format_signal_table(rows))
    print()
    print(f"signal: {csv_path}, {png_path}")
    return EXIT_OK


# --- config files -------------------------------------------------------------

def _apply_config(parser: argparse.ArgumentParser, data: dict[str, Any]) -> None:
    """Use a YAML mapping as the parser's defaults; unknown keys are errors."""
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config", "print_config")}
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            valid = ", ".join(sorted(d.replace("_", "-") for d in known))
            raise UsageError(f"unknown config key {key!r}; valid keys: {valid}")
        action = known[dest]
        if action.choices is not None and value not in action.choices:
            raise UsageError(
                f"bad value {value!r} for config key {key!r}; valid choices: {', '.join(map(str, action.choices))}"
            )
        if action.type is not None and value is not None and not isinstance(value, (list, dict)):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UsageError(f"bad value {value!r} for config key {key!r}") from None
        defaults[dest] = value
    parser.set_defaults(**defaults)
    for action in parser._actions:  # a positional given in the file is no longer required
        if action.dest in defaults and not action.option_strings:
            action.nargs = "?"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="reslab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, cmd in COMMANDS.items():
        child = sub.add_parser(name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(child)
        child.add_argument("--config", metavar="FILE.yaml", help="read option values from a YAML file")
        child.add_argument("--print-config", action="store_true", help="print the resolved options as YAML and exit")
    return parser


def _version() -> str:
    from . import __version__

    return f"reslab {__version__}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = _Parser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    name = next((a for a in argv if a in COMMANDS), None)
    if known.config and name:
        subparser = parser._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
        _apply_config(subparser, load_config_file(known.config))
    return parser.parse_args(argv)


def _print_config(args: argparse.Namespace) -> None:
    resolve = COMMANDS[args.command].resolve
    if resolve is not None:
        values = resolve(args)
    else:
        values = {k.replace("_", "-"): v for k, v in vars(args).items() if k not in _GLOBAL_DESTS}
    print(yaml.safe_dump(values, sort_keys=False), end="")


_GLOBAL_DESTS = ("command", "config", "print_config", "verbose")


def _log_to_stderr(verbose: bool) -> Callable[[], None]:
    """Send reslab's own log messages to stderr, message text only; returns what undoes it.

    Only the ``reslab`` logger is configured: the root logger and other libraries'
    loggers keep their levels and handlers (``-v`` must not make torch or matplotlib
    chatty), and reslab's messages stop at its own handler instead of reaching the
    root's too.  Under torchrun only rank 0 reports progress; other ranks show
    warnings and errors.  Undoing it on the way out leaves nothing behind, so
    calling main() again in one process never stacks a second handler.
    """
    logger = logging.getLogger("reslab")
    quiet = os.environ.get("RANK", "0") != "0"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        handler.flush()
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    restore_logging: Callable[[], None] | None = None
    try:
        args = parse_args(argv)
        restore_logging = _log_to_stderr(args.verbose)
        if args.print_config:
            _print_config(args)
            return EXIT_OK
        return COMMANDS[args.command].run(args)
    except SpecError as exc:
        # one write, newline included: under torchrun every rank reports into the same
        # stream, and print's separate write of the newline let two ranks' lines run together
        sys.stderr.write(f"reslab: error: {exc}\n")
        sys.stderr.flush()
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
    finally:
        if restore_logging is not None:
            restore_logging()
