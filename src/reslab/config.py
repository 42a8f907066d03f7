"""The training configuration: one dataclass, YAML in and out, CLI flags from its fields.

Every field carries its help text in ``metadata["help"]`` (the *why*, nanoGPT
style); ``reslab train`` generates one flag per field (``batch_size`` ->
``--batch-size``), so the CLI, ``--config FILE.yaml``, ``--print-config`` and
the ``config.yaml`` saved in every run directory can never drift apart.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError, choices_error
from .optim import optimizer_names, schedule_ignores_total

OPTIMIZERS = optimizer_names()  # sgd, adam, adamw (reslab.optim holds them)
PRECISIONS = ("fp32", "bf16", "fp16")
PROGRESS = ("auto", "bar", "log", "none")
CHANNELS_LAST = ("auto", "on", "off")
STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


def _f(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field with its help text (and CLI metadata) attached."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # -- what to train --
    model: str = _f("cifar_resnet20", "model name (reslab list models), tv:NAME for a torchvision model "
                                      "(reslab list models --all), or your own: py:package.module:Name or "
                                      "path/to/file.py:Name (a class or a function that returns an nn.Module)")
    norm: str = _f("bn", "norm spec: bn, bn:ghost=G, bn:splits=K, brn, gn, gn:G, gn:cpg=N, ln, in, rms, frn, "
                         "evonorm, none (reslab list norms)")
    conv: str = _f("default", "convolutions: default (the model's), ws (weight standardization, Qiao et al. 2019) "
                              "or sws (scaled WS, Brock et al. 2021); reslab list convs")
    init: str | dict[str, Any] = _f(
        "default", "init scheme for conv and linear weights; fixup, skipinit or nf (norm-free residual nets, "
        "with --norm none) or lsuv (on the first training batch); or a policy mapping "
        "({conv: ..., linear: ..., bias: ..., norm: ..., zero_init_residual: ..., model: ...}; reslab list inits)",
        policy=True)
    stem: str | None = _f(None, "ResNet stem: imagenet (7x7/2 + maxpool) or cifar (3x3/1); default: the model's",
                          choices=STEMS)
    shortcut: str | None = _f(None, "ResNet shortcut: A (zero-pad identity) or B (1x1 projection); "
                                    "default: the model's",
                              choices=SHORTCUTS)
    zero_init_residual: bool = _f(False, "start the last norm of each residual branch at 0 (Goyal et al. 2017)")
    model_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "the model's own options (reslab list models shows them), e.g. -o width=8 -o hidden=64,32; "
                "repeatable; in YAML a mapping", "key_values": True, "flags": ("--option", "-o")})
    # -- data --
    dataset: str = _f("mnist5k", "dataset spec (reslab list datasets), e.g. cifar10, synthetic:train=2560, "
                                 "folder:PATH (train/ and test/ class folders of images), npz:FILE")
    data_dir: str | None = _f(None, "where torchvision datasets live (default $RESLAB_DATA or ~/.cache/reslab/data)")
    download: bool = _f(False, "download a missing torchvision dataset")
    val_split: float = _f(0.0, "hold out this fraction of train and evaluate on it instead of the test split")
    # -- optimization --
    epochs: int = _f(10, "epochs to train (with --resume: train up to this many)")
    batch_size: int = _f(128, "global batch size (split across ranks under torchrun)")
    optimizer: str = _f("sgd", ", ".join(OPTIMIZERS[:-1]) + f" or {OPTIMIZERS[-1]}", choices=OPTIMIZERS)
    lr: float = _f(0.1, "peak learning rate")
    lr_base_size: int | None = _f(None, "scale --lr linearly with the batch (Goyal et al. 2017): --lr is the rate "
                                        "for a batch of this size, the run uses lr * batch_size / lr_base_size")
    momentum: float = _f(0.9, "SGD momentum (beta1 for adam/adamw)")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    weight_decay: float = _f(5e-4, "weight decay (decoupled for adamw)")
    decay_norm_and_bias: bool = _f(True, "apply weight decay to norm and bias parameters too")
    schedule: str = _f("constant", "lr schedule: constant, step:every=E,gamma=G, multistep, cosine, onecycle")
    warmup_epochs: float = _f(0.0, "linear warmup from 0 over this many epochs")
    label_smoothing: float = _f(0.0, "label smoothing for the cross-entropy loss")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)")
    seed: int = _f(0, "seed for init, shuffling, augmentation and dropout")
    log_every: int = _f(10, "record the mean train loss and the lr every this many steps in steps.jsonl "
                            "(and check for a non-finite loss)")
    # -- execution --
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    precision: str = _f("fp32", "fp32, or bf16/fp16 autocast (CUDA only)", choices=PRECISIONS)
    channels_last: str = _f("auto", "NHWC memory format: auto (on for models with convolutions, where oneDNN and "
                                    "cuDNN run them faster, unless a GroupNorm has < 8 channels per group, as "
                                    "in: slower in NHWC; off for the MLP), on or off",
                            choices=CHANNELS_LAST, switch=True)
    compile: bool = _f(False, "torch.compile the model (slower start, faster steps)")
    sync_bn: bool = _f(False, "convert BatchNorm to SyncBatchNorm under torchrun (GPU only)")
    eval_batch_size: int = _f(1024, "batch size for evaluation")
    # -- output --
    out: str | None = _f(None, "run directory (default: runs/<model>-<norm>-<init>-<dataset>-seed<seed>)")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint")
    progress: str = _f("auto", "auto (a bar on a terminal, log lines otherwise), bar, log or none",
                       choices=PROGRESS)
    tensorboard: bool = _f(False, "also write TensorBoard event files into RUN/tb/ (train loss and lr per "
                                  "--log-every interval, eval and train metrics per epoch, the config as "
                                  "hparams); needs pip install tensorboard")

    def __post_init__(self) -> None:
        if isinstance(self.channels_last, bool):  # TrainConfig(channels_last=True), as before auto existed
            self.channels_last = "on" if self.channels_last else "off"

    # -- derived --
    def effective_lr(self) -> float:
        """The peak learning rate the run uses: ``lr``, scaled with the batch under ``lr_base_size``."""
        return self.lr if self.lr_base_size is None else self.lr * self.batch_size / self.lr_base_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> TrainConfig:
        """Check every value that is a plain number or choice; SpecError on the first bad one.
        The specs that name a model, a norm or an init are checked where they are resolved
        (:func:`reslab.build.check`)."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise choices_error(flag(f.name), value, choices)
        positive = ("epochs", "batch_size", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise SpecError(f"{flag(name)} must be at least 1, got {getattr(self, name)}")
        non_negative = ("weight_decay", "warmup_epochs", "label_smoothing", "grad_clip", "momentum")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise SpecError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpecError(f"--lr must be positive, got {self.lr}")
        if self.lr_base_size is not None and self.lr_base_size < 1:
            raise SpecError(f"--lr-base-size must be at least 1 (a batch size), got {self.lr_base_size}")
        if self.nesterov and self.optimizer == "sgd" and self.momentum == 0:
            raise SpecError("--nesterov needs --momentum > 0")
        if self.momentum >= 1:
            raise SpecError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.label_smoothing >= 1:
            raise SpecError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.val_split < 1:
            raise SpecError(f"--val-split must be in [0, 1), got {self.val_split}")
        if not _DEVICE_RE.match(self.device):
            raise SpecError(f"unknown --device {self.device!r}; valid choices: auto, cpu, cuda, cuda:N")
        if self.resume and not self.out:
            raise SpecError("--resume needs --out DIR naming the run to continue")
        return self


# --- what a resume, or a sweep that finds a run already there, may change -----------

# Fields that say where or how a run executes, never what it computes: they may
# differ between a run directory's config.yaml and the config now asked for.
EXECUTION_FIELDS = ("out", "resume", "progress", "device", "data_dir", "download", "eval_batch_size", "compile",
                    "channels_last", "tensorboard")
def normalized_init(value: Any) -> Any:
    """An init value in the one form that configs compare and save: a stripped string,
    or a mapping with only the keys given (null values dropped), in InitPolicy's key order
    (keys it does not know last, for :func:`reslab.inits.parse_policy` to refuse)."""
    if isinstance(value, dict):
        from .inits import POLICY_KEYS

        known = {k: value[k] for k in POLICY_KEYS if k in value and value[k] is not None}
        return {**known, **{str(k): v for k, v in value.items() if k not in POLICY_KEYS}}
    return str(value).strip()


def differing_fields(saved: TrainConfig, requested: TrainConfig, ignore: tuple[str, ...] = EXECUTION_FIELDS
                     ) -> list[str]:
    """The fields (other than ``ignore``) whose values differ between two configs, in field order."""
    return [f.name for f in fields(TrainConfig)
            if f.name not in ignore and getattr(saved, f.name) != getattr(requested, f.name)]


def epochs_may_change(cfg: TrainConfig) -> bool:
    """True where the lr curve of the epochs already trained does not depend on ``epochs``
    (``constant``, ``step``, ``multistep`` at epoch numbers; :func:`reslab.optim.schedule_ignores_total`)."""
    try:
        return schedule_ignores_total(cfg.schedule)
    except SpecError:
        return False


def resume_conflicts(saved: TrainConfig, requested: TrainConfig) -> list[str]:
    """Fields a resume of ``saved`` may not change to ``requested``'s values.

    A resume may change how the run executes (EXECUTION_FIELDS) and, under a
    schedule whose curve does not depend on the total (constant, step, multistep
    at absolute epochs), ``epochs``; anything else would make the saved numbers
    those of another run.
    """
    conflicts = differing_fields(saved, requested)
    if "epochs" in conflicts and epochs_may_change(saved):
        conflicts.remove("epochs")
    return conflicts


def describe_differences(saved: TrainConfig, requested: TrainConfig, names: list[str]) -> str:
    """``epochs 3 -> 4, lr 0.1 -> 0.05``: how each named field differs."""
    def show(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("...").strip() \
            if isinstance(value, dict) else repr(value) if isinstance(value, str) else str(value)

    return ", ".join(f"{flag(n)} {show(getattr(saved, n))} -> {show(getattr(requested, n))}" for n in names)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_type(f: dataclasses.Field) -> type:
    """The scalar type of a field: ``str | None`` -> ``str``."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def parse_key_values(pairs: Sequence[str], what: str) -> dict[str, Any]:
    """``["stem=cifar", "width=2"]`` -> ``{"stem": "cifar", "width": 2}`` (values read as YAML scalars)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = str(pair).partition("=")
        if not eq or not key.strip():
            raise SpecError(f"malformed {what} {pair!r}: expected KEY=VALUE")
        name = key.strip().replace("-", "_")
        try:
            options[name] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            options[name] = value
    return options


def _coerce_options(f: dataclasses.Field, value: Any) -> dict[str, Any]:
    """Model options: a mapping (YAML), or ``KEY=VALUE`` pairs (``-o``, repeatable)."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = [value] if value.strip() else []
    if isinstance(value, (list, tuple)):
        value = parse_key_values(value, "model option")
    if not isinstance(value, Mapping):
        raise SpecError(f"bad value {value!r} for -o/--option: expected KEY=VALUE pairs or a mapping")
    return {str(k).strip().replace("-", "_"): v for k, v in value.items()}


def coerce(f: dataclasses.Field, value: Any) -> Any:
    """Convert a YAML or command-line value to a field's type; SpecError if it does not fit."""
    if f.metadata.get("policy"):
        return _coerce_policy(f, value)
    if f.metadata.get("key_values"):
        return _coerce_options(f, value)
    tp = field_type(f)
    if value is None:
        if f.default is None:
            return None
        raise SpecError(f"{flag(f.name)} needs a value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        lowered = str(value).strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise SpecError(f"bad value {value!r} for {flag(f.name)}: expected true or false")
    try:
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str):
                return int(value.strip())
            return int(value)
        if tp is float:
            result = float(value)
            if result != result or result in (float("inf"), float("-inf")):
                raise ValueError
            return result
    except (TypeError, ValueError):
        raise SpecError(f"bad value {value!r} for {flag(f.name)}: expected {tp.__name__}") from None
    if f.metadata.get("switch"):  # auto/on/off; a boolean (config.yaml of earlier versions) is on or off
        if isinstance(value, bool):
            return "on" if value else "off"
        lowered = str(value).strip().lower()
        return {"true": "on", "yes": "on", "1": "on", "false": "off", "no": "off", "0": "off"}.get(lowered, lowered)
    return str(value)


def _coerce_policy(f: dataclasses.Field, value: Any) -> str | dict[str, Any]:
    """An init value: a scheme string, or a policy mapping (from YAML, or ``--init '{conv: ...}'``)."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise SpecError(f"bad value {value!r} for {flag(f.name)}: not a valid YAML mapping") from None
    if value is None:
        raise SpecError(f"{flag(f.name)} needs a value")
    if isinstance(value, dict):
        return normalized_init({str(k): v for k, v in value.items()})  # checked by reslab.build.check
    if isinstance(value, (list, tuple, set)):
        raise SpecError(f"bad value {value!r} for {flag(f.name)}: expected a scheme string or a policy mapping")
    return normalized_init(value)


def config_from_dict(data: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """Apply a mapping (YAML keys with ``_`` or ``-``) onto ``base``; unknown keys are errors."""
    by_name = {f.name: f for f in fields(TrainConfig)}
    values = dataclasses.asdict(base or TrainConfig())
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in by_name:
            raise SpecError(
                f"unknown config key {key!r}; valid keys: {', '.join(n.replace('_', '-') for n in by_name)}"
            )
        values[name] = coerce(by_name[name], value)
    return TrainConfig(**values)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or non-mapping file is a SpecError."""
    file = Path(path)
    if not file.is_file():
        named = named_config_path(str(path))
        if named is None:
            raise SpecError(
                f"config file {str(path)!r} does not exist; shipped configs: {', '.join(named_configs())}"
            )
        file = named
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise SpecError(f"config file {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise SpecError(f"config file {str(path)!r} must hold a mapping of option: value")
    return data


_CONFIG_DIR = Path(__file__).parent / "configs"


def named_configs() -> list[str]:
    """The recipes shipped with reslab (``--config NAME`` finds them)."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.yaml"))


def named_config_path(name: str) -> Path | None:
    path = _CONFIG_DIR / f"{name.removesuffix('.yaml')}.yaml"
    return path if path.is_file() else None
