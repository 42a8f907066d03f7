"""The ``reslab`` command line: ``reslab list | inspect | ...``.

Every command accepts ``--config FILE.yaml`` (values for its options, keys
spelled as the flags are, with ``-`` or ``_``) and ``--print-config`` (print the
resolved options as YAML and exit).  Bad input of any kind ends in one line on
stderr and exit code 2; a failed run exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import yaml

from .config import load_config_file
from .errors import SpecError

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


def _list_sources() -> dict[str, Callable[[], dict[str, str]]]:
    from .data import list_datasets
    from .inits import list_inits
    from .models import list_models
    from .norms import list_norms

    return {"models": list_models, "norms": list_norms, "inits": list_inits, "datasets": list_datasets}


@command("list", "list the models, norms, init schemes or datasets reslab knows", _add_list_arguments)
def run_list(args: argparse.Namespace) -> int:
    entries = _list_sources()[args.what]()
    width = max(len(name) for name in entries)
    for name, description in entries.items():
        print(f"{name.ljust(width)}  {description}")
    return EXIT_OK



def _add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model name (see `reslab list models`)")
    parser.add_argument("--norm", default="bn", help="norm spec, e.g. bn, gn, gn:16, ln, in, rms, none")
    parser.add_argument(
        "--init", default="default",
        help="init spec or policy, e.g. kaiming_normal:mode=fan_out (see `reslab list inits`)",
    )
    parser.add_argument("--num-classes", type=int, default=10, help="size of the classifier output")
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (default: the model's)")
    parser.add_argument("--input-size", type=int, default=None, help="input height = width (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the initialization")
    parser.add_argument(
        "--option", "-o", action="append", default=[], metavar="KEY=VALUE",
        help="model option, e.g. -o stem=cifar -o shortcut=B (repeatable)",
    )
    parser.add_argument("--plot", default=None, metavar="PNG", help="also save predicted vs measured std per tensor")


def parse_key_values(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """``["stem=cifar", "width=2"]`` -> ``{"stem": "cifar", "width": 2}`` (YAML scalars)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"malformed {what} {pair!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
    return options


@command("inspect", "parameters, MACs per image and the per-tensor init report of a model", _add_inspect_arguments)
def run_inspect(args: argparse.Namespace) -> int:
    from .diagnose import count_macs, count_params, human_count
    from .inits import init_weights
    from .models import build_model, model_input

    options = parse_key_values(args.option, "model option")
    channels, size = model_input(args.model)
    channels = args.in_channels or channels
    size = args.input_size or size
    model = build_model(
        args.model, num_classes=args.num_classes, in_channels=channels, norm=args.norm,
        input_size=size, **options,
    )
    report = init_weights(model, args.init, seed=args.seed)
    params = count_params(model)
    macs = count_macs(model, (channels, size, size))
    print(f"model       {args.model}  norm={args.norm}  init={args.init}")
    print(f"input       {channels}x{size}x{size}, {args.num_classes} classes")
    print(f"parameters  {params:,} ({human_count(params)})")
    print(f"MACs/image  {macs:,} ({human_count(macs)})")
    print()
    print(report.format_table())
    if args.plot:
        from .plots import plot_init_report

        path = plot_init_report(report, args.plot, title=f"{args.model} ({args.norm}, {args.init})")
        print(f"\nplot: {path}")
    return EXIT_OK



# --- train ----------------------------------------------------------------------


def add_config_flags(parser: argparse.ArgumentParser, *, as_lists: bool = False) -> None:
    """One flag per TrainConfig field; values stay strings until ``config_from_dict`` types them."""
    from .config import TrainConfig, field_type

    for f in fields(TrainConfig):
        if f.name in ("resume",) and as_lists:
            continue
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" ({', '.join(f.metadata['choices'])})"
        default_text = "" if f.default is None else f"; default {f.default}"
        flag_name = "--" + f.name.replace("_", "-")
        if field_type(f) is bool and not as_lists:
            parser.add_argument(flag_name, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text + default_text)
        else:
            metavar = "V[,V...]" if as_lists else f.name.upper()
            parser.add_argument(flag_name, dest=f.name, default=argparse.SUPPRESS, metavar=metavar,
                                help=help_text + default_text)


def train_config_from_args(args: argparse.Namespace):
    from .config import config_from_dict

    values = {k: v for k, v in vars(args).items() if k not in _GLOBAL_DESTS}
    return config_from_dict(values)


def _resolve_train(args: argparse.Namespace) -> dict[str, Any]:
    return train_config_from_args(args).validate().to_dict()


@command("train", "train one model on one dataset into a run directory", add_config_flags, _resolve_train)
def run_train(args: argparse.Namespace) -> int:
    from .train import train

    result = train(train_config_from_args(args))
    s = result.summary
    acc = s["final_eval_acc"]
    print(f"{result.status}: {s['epochs_completed']}/{s['epochs']} epochs, "
          f"final {s['eval_split']} acc {acc:.4f}" if acc is not None else f"{result.status}: no epoch completed",
          f"-> {result.out}")
    return EXIT_FAILED if result.status == "failed" else EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
        )
        if args.print_config:
            _print_config(args)
            return EXIT_OK
        return COMMANDS[args.command].run(args)
    except SpecError as exc:
        print(f"reslab: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("reslab: interrupted", file=sys.stderr)
        return 130
