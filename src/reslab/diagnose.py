"""Diagnostics that need no training: parameter and MAC counts, signal propagation at init."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .config import TrainConfig
from .errors import SpecError

if TYPE_CHECKING:
    from .data import Dataset


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on one ``(C, H, W)`` image.

    Counted by torch's own ``FlopCounterMode`` (matmuls and convolutions, which
    dominate a ResNet); one MAC is two FLOPs.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=param.device if param is not None else "cpu")
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def human_count(n: float) -> str:
    """1234567 -> '1.23M' (SI-style suffixes, three significant figures)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


# --- signal propagation at initialization -------------------------------------------------
#
# One forward and one backward pass of a freshly initialized model on one batch,
# recording the scale of the signal at a fixed set of points along the depth
# ("blocks").  This is the picture of He et al. 2015 (arXiv 1502.01852, Sec. 2.2:
# a ReLU layer keeps the second moment of its input iff Var(w) = 2/fan_in) and of
# the signal propagation plots of Brock, De & Smith 2021 (arXiv 2101.08692, Sec. 3).

SIGNAL_COLUMNS = ("norm", "init", "block", "name", "act_mean", "act_std", "act_sq_mean", "grad_std")

DEFAULT_SIGNAL_BATCH = 32  # images per batch: enough for stable moments, seconds on a CPU for CIFAR nets


@dataclass(frozen=True)
class SignalRow:
    """The signal at one point of one (norm, init) combination; one row of ``signal.csv``.

    Moments are over every element of the point's output ``x`` (N, C, H, W) or (N, C),
    in float64, with the population std (``correction=0``), so the second moment is
    exactly ``act_mean**2 + act_std**2``.
    """

    norm: str
    init: str
    block: int  # 0 = the stem output (ResNets, simple_cnn) or the first hidden layer (mlp)
    name: str  # the point: "stem", "layer1.0" (a residual block), "layer1.0.conv1" (a plain pair), ...
    act_mean: float  # x.mean()
    act_std: float  # x.std(correction=0)
    act_sq_mean: float  # Brock et al. 2021's channel-wise squared mean: x.mean(dim=(0, 2, 3)).pow(2).mean()
    grad_std: float  # std of dloss/dx, loss = cross-entropy summed over the batch

    @property
    def act_second_moment(self) -> float:
        """``E[x^2]``, the quantity He et al. 2015 keep constant with depth."""
        return self.act_mean**2 + self.act_std**2

    def as_tuple(self) -> tuple:
        return tuple(getattr(self, c) for c in SIGNAL_COLUMNS)


# A probe is a module whose forward outputs are signal points: the function maps the
# call index within one forward pass (a module such as a block's shared ReLU runs more
# than once) to the point's name, or None where that call is not a point.
Probe = tuple[nn.Module, Callable[[int], "str | None"]]


def _is_residual_block(module: nn.Module) -> bool:
    """A block that declares its residual branch (:mod:`reslab.model_inits`) or zeroes it (timm's convention)."""
    from .model_inits import declares_branch

    return declares_branch(module) or callable(getattr(module, "zero_init_last", None))


def signal_probes(model: nn.Module) -> tuple[str, list[Probe]]:
    """Where :func:`signal_propagation` measures, and what one step of depth is.

    Returns ``(unit, probes)``; the points are recorded in forward order.

    * Residual ResNets: the stem output (after ReLU and max-pool) and every residual
      block's output (after the addition and the final ReLU), as in Brock et al. 2021.
    * Plain ResNets (``residual=False``, ``plain20`` ...): the stem and every
      conv-norm-ReLU pair, i.e. two points per BasicBlock (``layer1.0.conv1``, then
      ``layer1.0.conv2``, the block output) and three per Bottleneck, so one step of
      depth is one ReLU layer - the unit of He et al.'s analysis.
    * ``simple_cnn``: after each of its three conv-norm-ReLU layers (before pooling).
    * ``mlp``: after each hidden ReLU (before dropout).
    * Any other model whose blocks declare their residual branch (``residual_branch()``,
      or timm's ``zero_init_last()``; :mod:`reslab.model_inits`), as your own models,
      ``tv:resnet*`` and timm's ResNets do: every such block's output.
    * Any other model: every call of every ``nn.ReLU`` module, in forward order.
    """
    from .models import MLP, ResNet, SimpleCNN

    def once(name: str) -> Callable[[int], str | None]:
        return lambda call: name if call == 0 else None

    if isinstance(model, ResNet):
        probes: list[Probe] = [(model.maxpool, once("stem"))]  # maxpool is an Identity for the CIFAR stem
        for stage in model.stage_names:
            for index, block in enumerate(getattr(model, stage)):
                path = f"{stage}.{index}"
                if model.residual or not hasattr(block, "relu"):
                    probes.append((block, once(path)))
                else:  # a plain block calls its ReLU once per conv-norm-ReLU pair, in order
                    probes.append((block.relu, lambda call, path=path: f"{path}.conv{call + 1}"))
        unit = "residual block" if model.residual else "conv-norm-ReLU layer"
        return f"{unit} (0 = stem)", probes
    if isinstance(model, SimpleCNN):
        names = ("conv1", "conv2", "conv3")  # the 4th call of model.relu is the head's fc1: not a conv layer
        return "conv-norm-ReLU layer (0 = conv1)", [
            (model.relu, lambda call: names[call] if call < len(names) else None)]
    if isinstance(model, MLP):
        relus = [m for m in model.features if isinstance(m, nn.ReLU)]
        return "hidden layer (0 = first)", [(relu, once(f"hidden{i + 1}")) for i, relu in enumerate(relus)]
    blocks = [(path, m) for path, m in model.named_modules() if path and _is_residual_block(m)]
    if blocks:
        return "residual block (0 = the first)", [(block, once(path)) for path, block in blocks]
    relus = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ReLU)]
    return "ReLU call", [(m, lambda call, path=path: path if call == 0 else f"{path}#{call + 1}") for path, m in relus]


def _moments(x: torch.Tensor) -> tuple[float, float, float]:
    """``(mean, std, channel-wise squared mean)`` of an (N, C, ...) tensor, in float64."""
    x = x.detach().double()
    reduce = [0, *range(2, x.dim())]  # every dim but the channels
    channel_means = x.mean(dim=reduce)  # (C,)
    return float(x.mean()), float(x.std(correction=0)), float(channel_means.pow(2).mean())


def _grad_std(g: torch.Tensor) -> float:
    return float(g.detach().double().std(correction=0))


def measure_signal(model: nn.Module, x: torch.Tensor, labels: torch.Tensor
                   ) -> list[tuple[str, float, float, float, float]]:
    """One forward and backward pass of ``model`` in training mode; one tuple per point.

    Each tuple is ``(name, act_mean, act_std, act_sq_mean, grad_std)``, in forward
    order.  Training mode because that is the pass a training step makes: BN uses
    the batch's statistics (in eval mode at init it would be the identity) and
    dropout drops.  The loss is cross-entropy on ``labels`` summed (not averaged)
    over the batch, so the gradient at each sample does not shrink with the batch size.
    Forward hooks read each point's output and ``Tensor.register_hook`` the gradient
    at that output.  The model's parameter gradients are left populated.
    """
    _, probes = signal_probes(model)
    points: list[list] = []  # [name, mean, std, sq_mean, grad_std]
    calls: dict[int, int] = {}

    def hook(module: nn.Module, _inputs, output: torch.Tensor, namer) -> None:
        call = calls.get(id(module), 0)
        calls[id(module)] = call + 1
        name = namer(call)
        if name is None:
            return
        point = [name, *_moments(output), float("nan")]
        points.append(point)
        if output.requires_grad:
            output.register_hook(lambda grad: point.__setitem__(4, _grad_std(grad)))

    handles = [module.register_forward_hook(lambda m, i, o, namer=namer: hook(m, i, o, namer))
               for module, namer in probes]
    was_training = model.training
    model.train()
    try:
        logits = model(x)  # (N, num_classes)
        loss = F.cross_entropy(logits, labels, reduction="sum")
        model.zero_grad(set_to_none=True)
        loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [tuple(point) for point in points]


def _spec_list(specs: str | Sequence[str], what: str) -> list[str]:
    from .specs import split_nonempty_list

    if isinstance(specs, str):
        items = split_nonempty_list(specs, f"{what} list")
    else:
        items = [str(s).strip() for s in specs]
        if not items or any(not item for item in items):
            raise SpecError(f"{what} list {specs!r} has an empty item")
    repeated = sorted({item for item in items if items.count(item) > 1})
    if repeated:
        raise SpecError(f"{what} list {specs!r} repeats {repeated[0]!r}")
    return items


def _signal_batch(model_name: str, batch: torch.Tensor | None, batch_size: int, seed: int,
                  dataset: str | Dataset | None, data_dir: str | None, download: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The inputs, labels and class count :func:`signal_propagation` measures on (see there)."""
    from .data import Dataset
    from .datasets import load_dataset
    from .models import model_input

    gen = torch.Generator().manual_seed(seed)  # batch and labels; drawn on the CPU, so any device sees the same
    if batch is not None:
        if batch.dim() != 4:
            raise SpecError(f"batch must be (N, C, H, W), got shape {tuple(batch.shape)}")
        x = batch.float()
        return x, torch.randint(10, (x.shape[0],), generator=gen), 10
    if dataset is not None:
        data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, data_dir=data_dir, download=download)
        if batch_size > data.num_train:
            raise SpecError(f"batch size {batch_size} is larger than the {data.num_train} train images of {data.spec}")
        idx = torch.randperm(data.num_train, generator=gen)[:batch_size].to(data.device)
        return data.normalize(data.train_images[idx]), data.train_labels[idx], data.num_classes  # (B, C, H, W), (B,)
    channels, side = model_input(model_name)
    x = torch.randn(batch_size, channels, side, side, generator=gen)  # (B, C, H, W)
    return x, torch.randint(10, (batch_size,), generator=gen), 10


def signal_propagation(
    model: str | TrainConfig,
    norms: str | Sequence[str] = ("none", "bn"),
    inits: str | Sequence[str] = ("kaiming_normal", "xavier_normal"),
    *,
    batch: torch.Tensor | None = None,
    batch_size: int = DEFAULT_SIGNAL_BATCH,
    seed: int = 0,
    dataset: str | Dataset | None = None,
    data_dir: str | None = None,
    download: bool = False,
    options: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
    conv: str = "default",
) -> list[SignalRow]:
    """Signal propagation at initialization for every (norm, init) combination.

    ``model`` is a model name (with ``options``, the model's own options, and ``conv``)
    or a config whose model fields say everything (``stem``, ``shortcut``,
    ``model_options``, ...; :mod:`reslab.build`).  Builds the model with each norm,
    initializes it with each init policy (seeded by ``seed``, so every norm sees the
    same weights), and runs :func:`measure_signal` on one batch shared by all
    combinations:

    * ``batch``: an ``(N, C, H, W)`` tensor to use as is; labels are random;
    * else ``dataset`` (a spec or a loaded :class:`~reslab.data.Dataset`): ``batch_size``
      train images drawn at random, normalized by the dataset's statistics, with their labels;
    * else ``batch_size`` images of N(0, 1) noise of the model's input shape
      (:func:`~reslab.models.model_input`) and random labels.

    Whole-model inits build the model they need (``fixup``, ``skipinit`` and ``nf`` their
    residual branch) and ``lsuv`` calibrates on the same batch; ``conv`` weight-standardizes
    the convolutions (``ws``, ``sws``).

    The same ``seed`` gives the same numbers: it fixes the batch, the labels, the
    weights and dropout's masks; the caller's global RNG is left untouched.
    Every norm and init spec, the batch size and the dataset are checked (each norm
    by building the model) before anything runs; bad ones raise :class:`SpecError`.
    Rows come combination by combination (norms outer, inits inner), points in forward order.
    """
    from .build import build, init_model, model_config
    from .inits import needs_batch, parse_policy

    base = model if isinstance(model, TrainConfig) else \
        model_config(model, conv=conv, model_options=dict(options or {}))
    norms = _spec_list(norms, "norm")
    inits = _spec_list(inits, "init")
    for init in inits:
        parse_policy(init)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"batch size must be a positive integer, got {batch_size!r}")
    x, labels, num_classes = _signal_batch(base.model, batch, batch_size, seed, dataset, data_dir, download)
    x, labels = x.to(device), labels.to(device)
    configs = [dataclasses.replace(base, norm=norm, init=init, seed=seed) for norm in norms for init in inits]

    def build_one(cfg: TrainConfig) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # construction draws default weights from the global RNG
            return build(cfg, num_classes=num_classes, in_channels=x.shape[1], input_size=x.shape[-1])

    # Validate every norm (a gn:G that does not divide a width, ...) and init (fixup on a
    # plain net) before running any; on the meta device, which allocates and draws
    # nothing (as train.preflight does).
    with torch.device("meta"):
        for cfg in configs:
            build_one(cfg)

    rows: list[SignalRow] = []
    for cfg in configs:
        model_ = build_one(cfg).to(device)
        init_model(model_, cfg, batch=x if needs_batch(cfg.init) else None)
        fork = [] if torch.device(device).type == "cpu" else [torch.device(device)]
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(seed)  # dropout masks
            try:
                points = measure_signal(model_, x, labels)
            except ValueError as exc:  # e.g. BN on one value per channel, an input the model rejects
                raise SpecError(f"{cfg.model} (norm {cfg.norm}) cannot run on a batch of shape "
                                f"{tuple(x.shape)}: {exc}") from None
        rows.extend(SignalRow(cfg.norm, str(cfg.init), block, *point) for block, point in enumerate(points))
    return rows


def signal_unit(model_name: str, options: Mapping[str, Any] | None = None) -> str:
    """What one step of depth is for ``model_name`` (an x-axis label), e.g. 'residual block (0 = stem)'."""
    from .models import build_model

    try:
        with torch.device("meta"):  # only the structure is needed: nothing allocated, no RNG drawn
            return signal_probes(build_model(model_name, norm="none", **dict(options or {})))[0]
    except SpecError:  # a model of your own built for other inputs than the defaults (3x32x32)
        return "point (in forward order)"


def signal_csv(rows: Sequence[SignalRow]) -> str:
    """The rows as CSV text with :data:`SIGNAL_COLUMNS`; floats at full precision."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SIGNAL_COLUMNS)
    writer.writerows(row.as_tuple() for row in rows)
    return buffer.getvalue()


def signal_combos(rows: Sequence[SignalRow]) -> dict[tuple[str, str], list[SignalRow]]:
    """Rows grouped by (norm, init), in first-seen order."""
    groups: dict[tuple[str, str], list[SignalRow]] = {}
    for row in rows:
        groups.setdefault((row.norm, row.init), []).append(row)
    return groups


FULL_TABLE_MAX_COMBOS = 2  # more combinations than this: one summary line each


def format_signal_table(rows: Sequence[SignalRow]) -> str:
    """Every point for up to two combinations; otherwise act_std and grad_std at the first,
    middle and last point of each combination (the full numbers are in the CSV)."""
    from .tables import format_table

    combos = signal_combos(rows)
    if len(combos) <= FULL_TABLE_MAX_COMBOS:
        return format_table(SIGNAL_COLUMNS, [row.as_tuple() for row in rows], digits=3)
    depth = max(len(points) for points in combos.values())
    picks = sorted({0, (depth - 1) // 2, depth - 1})
    headers = ["norm", "init", *(f"act_std@{b}" for b in picks), *(f"grad_std@{b}" for b in picks)]
    table = []
    for (norm, init), points in combos.items():
        at = {row.block: row for row in points}
        table.append([norm, init, *(at[b].act_std if b in at else None for b in picks),
                      *(at[b].grad_std if b in at else None for b in picks)])
    return format_table(headers, table, digits=3)
