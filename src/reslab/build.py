"""From names to an initialized model: the one path every command takes.

``reslab train``, ``eval``, ``inspect``, ``signal``, sweeps, studies, the
benchmarks and the tests all build a model here, from the model fields of a
:class:`~reslab.config.TrainConfig` (``model``, ``norm``, ``conv``, ``init``,
``stem``, ``shortcut``, ``zero_init_residual`` and ``model_options``, the
``-o KEY=VALUE`` flags)::

    cfg = TrainConfig(model="cifar_resnet20", norm="gn", init="fixup", model_options={"width": 8})
    model = build(cfg, num_classes=10, in_channels=1, input_size=28)   # built, not initialized
    report = init_model(model, cfg)                                     # cfg.init, seeded by cfg.seed

This is the only module that knows an init may change the architecture:
``fixup``, ``skipinit`` and ``nf`` need residual blocks that carry their scalars
(:mod:`reslab.model_inits`), so :func:`model_options` adds the ResNet options
(``branch``, ``alpha``) they need to reslab's own ResNets, and refuses a model without
residual branches in one line.  A ``tv:`` model or your own (``py:pkg.mod:Name``,
``file.py:Name``) gets the branch after it is built, on every block that declares
one (``residual_branch()``; :func:`reslab.model_inits.attach_branch`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .config import TrainConfig, config_from_dict
from .convs import resolve_conv
from .data import Dataset
from .errors import SpecError
from .inits import InitReport, init_weights, is_model_init, needs_batch, parse_policy, resolve_model_init
from .model_inits import attach_branch, check_attachable
from .models import build_model, is_torchvision_name, is_user_model_name, model_input, model_names
from .models import model_options as accepted_options
from .norms import norm_factory

log = logging.getLogger(__name__)

# The config fields that say which model to build and how to initialize it; every
# command that builds a model takes a flag for each (``reslab train``, ``inspect``, ``signal``).
# The arguments every model gets from the run (its data and its --norm, --conv): never -o options.
SET_FROM_RUN = ("num_classes", "in_channels", "input_size", "norm", "conv")
MODEL_FIELDS = ("model", "norm", "conv", "init", "stem", "shortcut", "zero_init_residual", "model_options")


def _residual_models() -> list[str]:
    return [name for name in model_names() if "branch" in accepted_options(name)]


def init_options(model_name: str, init: Any, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model options ``init`` needs (``{"branch": "fixup"}``, ``{"branch": "nf", "alpha": 0.2}``).

    Empty for an init that fills tensors only.  A model without residual branches, or
    ``options`` that say another branch, is a one-line SpecError.
    """
    spec = init.get("model") if isinstance(init, Mapping) else init
    if not is_model_init(spec):
        return {}
    resolved = resolve_model_init(spec)
    if resolved.entry.branch is None or _attaches_branch(model_name):
        return {}
    if "branch" not in accepted_options(model_name):
        raise SpecError(f"init {resolved.text!r} needs a model with residual branches; {model_name!r} has none "
                        f"(valid models: {', '.join(_residual_models())})")
    wanted = {"branch": resolved.entry.branch, **resolved.entry.options(**resolved.args)}
    for key, value in wanted.items():
        given = (options or {}).get(key)
        if given is not None and str(given) != str(value):
            raise SpecError(f"init {resolved.text!r} builds the model with {key}={value}, but the model options "
                            f"say {key}={given}; drop one of the two")
    return wanted


def _attaches_branch(model_name: str) -> bool:
    """True for the models whose blocks get an init's branch after construction (``tv:`` and your own:
    :func:`reslab.model_inits.attach_branch`); reslab's ResNets are built with it instead."""
    return is_torchvision_name(model_name) or is_user_model_name(model_name)


def attached_branch(cfg: TrainConfig) -> str | None:
    """The branch ``cfg.init`` adds to the declared residual blocks of a ``tv:`` or user model, if any."""
    spec = cfg.init.get("model") if isinstance(cfg.init, Mapping) else cfg.init
    if not _attaches_branch(cfg.model) or not is_model_init(spec):
        return None
    return resolve_model_init(spec).entry.branch


def model_options(cfg: TrainConfig) -> dict[str, Any]:
    """Every model option ``cfg`` sets: ``-o KEY=VALUE``, the ResNet flags, and what its init needs."""
    options = dict(cfg.model_options)
    for key in options:
        if key in SET_FROM_RUN:
            raise SpecError(f"option {key!r} of model {cfg.model!r} is set by reslab from the data and the "
                            f"flags; drop -o {key}{' (use --' + key + ')' if key in ('norm', 'conv') else ''}")
    policy_zero = cfg.init.get("zero_init_residual") if isinstance(cfg.init, Mapping) else None
    flags = {"stem": cfg.stem, "shortcut": cfg.shortcut,
             "zero_init_residual": True if cfg.zero_init_residual or policy_zero else None}
    for key, value in flags.items():
        if value is None:
            continue
        if key in options and str(options[key]).lower() != str(value).lower():
            raise SpecError(f"--{key.replace('_', '-')} {value} contradicts -o {key}={options[key]}; "
                            "drop one of the two")
        options[key] = value
    if cfg.zero_init_residual and policy_zero is False:
        raise SpecError("--zero-init-residual contradicts the init policy's zero_init_residual: false; "
                        "drop one of the two")
    options.update(init_options(cfg.model, cfg.init, options))
    return options


def check(cfg: TrainConfig) -> None:
    """Check the model fields of ``cfg`` without building anything: norm, conv, init and the options
    an init needs (fixup on a plain net is refused here).  A one-line SpecError on the first bad one."""
    norm_factory(cfg.norm)
    resolve_conv(cfg.conv)
    parse_policy(cfg.init)
    model_options(cfg)
    branch = attached_branch(cfg)
    if branch is not None:
        check_attachable(branch, cfg.model)


def build(cfg: TrainConfig, *, num_classes: int = 10, in_channels: int | None = None,
          input_size: int | None = None) -> nn.Module:
    """The model ``cfg`` names, built with every option it sets, not yet initialized.

    ``in_channels`` and ``input_size`` default to the model's natural input
    (:func:`reslab.models.model_input`).  Construction draws the modules' default
    weights from the global RNG, as ``nn.Module`` constructors do.
    """
    channels, side = model_input(cfg.model)
    model = build_model(cfg.model, num_classes=num_classes, in_channels=in_channels or channels, norm=cfg.norm,
                        input_size=input_size or side, conv=cfg.conv, **model_options(cfg))
    branch = attached_branch(cfg)
    if branch is not None:
        attach_branch(model, branch, cfg.model)
    return model


def init_model(model: nn.Module, cfg: TrainConfig, *, batch: torch.Tensor | None = None) -> InitReport:
    """Initialize ``model`` by ``cfg.init``, seeded by ``cfg.seed``; one report row per tensor.

    A data-dependent init (``lsuv``) needs ``batch``, the inputs it calibrates on.
    """
    report = init_weights(model, cfg.init, seed=cfg.seed, batch=batch)
    variances = [row.output_var for row in report if row.output_var is not None]
    if variances:
        log.info("init %s: output variance of %d layers on the first batch in [%.3f, %.3f]",
                 cfg.init, len(variances), min(variances), max(variances))
    return report


def first_batch(cfg: TrainConfig, data: Dataset) -> torch.Tensor:
    """The run's first training batch (all of it, whatever the world size), on the CPU."""
    x, _ = next(iter(data.train_batches(cfg.batch_size, epoch=0, seed=cfg.seed)))
    return x.cpu()  # (B, C, H, W) normalized and augmented, exactly as step 1 sees it


def build_for(cfg: TrainConfig, data: Dataset, *, initialize: bool = True) -> nn.Module:
    """The model of a run of ``cfg`` on ``data``: sized for it and initialized by ``cfg.init`` (on the
    CPU, NCHW).  A data-dependent init sees the run's first training batch.
    ``initialize=False`` only builds it, for weights loaded afterwards."""
    model = build(cfg, num_classes=data.num_classes, in_channels=data.in_channels, input_size=data.image_size)
    if initialize:
        init_model(model, cfg, batch=first_batch(cfg, data) if needs_batch(cfg.init) else None)
    return model


def model_config(model: str, **fields: Any) -> TrainConfig:
    """A config that names a model and how to build it (every other field at its default):
    ``model_config("cifar_resnet20", norm="gn", model_options={"width": 8})``.  Values are
    typed as the config's flags are (``"true"`` -> True); unknown fields are a SpecError."""
    return config_from_dict({"model": model, **fields})


__all__ = ["MODEL_FIELDS", "attached_branch", "build", "build_for", "check", "first_batch", "init_model",
           "init_options", "model_config", "model_options"]
