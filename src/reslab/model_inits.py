"""Init schemes that act on a whole model: Fixup, SkipInit, the NF-ResNet recipe and LSUV.

Every other init scheme (:mod:`reslab.inits`) fills one tensor at a time.  These four
need the model: which layers sit in a residual branch, how many branches there are,
or what each layer outputs on real data.  ``--init NAME`` (or ``init_weights(model,
"NAME")``) first applies a per-tensor base policy and then the model step:

============ ======================================= =============================================
scheme       base policy (conv / linear)             model step
============ ======================================= =============================================
``fixup``    He normal (fan_out, ReLU) / zeros       in each residual branch of m convs out of L
                                                     branches: the convs but the last scaled by
                                                     L^(-1/(2m-2)), the last at zero; Fixup's
                                                     scalar biases 0 and multipliers 1
``skipinit`` He normal (fan_out, ReLU) / default     each branch's gain ``skipinit_gain`` = 0
``nf``       He normal (fan_in, linear) / N(0, 0.01) each Scaled-WS conv's ``gain`` = 1
``lsuv``     orthogonal / orthogonal                 layer by layer, the weight rescaled until the
                                                     layer's output variance on a training batch
                                                     is 1 within ``tol`` (at most ``max_iter``)
============ ======================================= =============================================

They are entries of the one init registry in :mod:`reslab.inits` (``reslab list inits``
marks them ``[whole model]``).  ``fixup``, ``skipinit`` and ``nf`` need blocks that carry
their scalars, so the model is *built* for them: :func:`reslab.build.model_options` gives
the ResNet options (``branch``, ``alpha``) every command passes to ``build_model``.
A model without residual branches (plain nets, ``mlp``, ``simple_cnn``, ``tv:`` models)
cannot take them: a SpecError says so.

References: Zhang, Dauphin & Ma 2019 (arXiv 1901.09321); De & Smith 2020 (arXiv
2002.10444); Brock, De & Smith 2021 (arXiv 2101.08692); Mishkin & Matas 2016
(arXiv 1511.06422).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SpecError
from .lsuv import DEFAULT_MAX_ITER, DEFAULT_TOL, check_lsuv_args, lsuv_init
from .registry import Resolved
from .specs import positive_float, to_float, to_int


@dataclass(frozen=True)
class Note:
    """What a model step did to one tensor, for the init report.

    ``scale``: the tensor was multiplied by it (the report keeps the base scheme and
    scales its predicted std); otherwise ``scheme`` and ``predicted`` replace the row's.
    """

    scheme: str
    predicted: float | None = None
    scale: float | None = None
    output_var: float | None = None


@dataclass(frozen=True)
class ModelInit:
    """A whole-model init scheme: an entry of the one init registry (:mod:`reslab.inits`)."""

    name: str
    description: str
    params: dict[str, tuple[Callable[[str], Any], Any]]  # argument -> (converter, default)
    base: dict[str, str]  # the per-tensor policy fields applied first
    apply: Callable[..., dict[int, Note]]  # (model, batch, **args) -> notes by id(tensor)
    branch: str | None = None  # the ResNet branch the model must be built with
    needs_batch: bool = False
    check: Callable[..., str | None] | None = None  # (**args): one-line SpecError on bad arguments
    options: Callable[..., dict[str, Any]] = field(default=lambda **_: {})  # (**args) -> extra model options


def apply_model_init(model: nn.Module, resolved: Resolved[ModelInit], batch: torch.Tensor | None = None
                     ) -> dict[int, Note]:
    """The model step of a resolved scheme on ``model`` (after its base policy); notes by ``id(tensor)``."""
    entry = resolved.entry
    if entry.needs_batch and batch is None:
        raise SpecError(f"init {resolved.text!r} needs a batch of training inputs: init_weights(model, "
                        f"{resolved.text!r}, batch=x); reslab train uses the run's first training batch")
    with torch.no_grad():
        return entry.apply(model, batch, **resolved.args)


def _blocks(model: nn.Module, branch: str, scheme: str) -> list[nn.Module]:
    from .models.resnet import _ResidualBlock

    blocks = [m for m in model.modules() if isinstance(m, _ResidualBlock) and m.residual]
    if not blocks:
        raise SpecError(f"init {scheme!r} needs a model with residual branches; {type(model).__name__} has none")
    kinds = {b.branch_kind for b in blocks}
    if kinds != {branch}:
        raise SpecError(f"init {scheme!r} needs a model built with branch={branch!r} (build_model(..., "
                        f"branch={branch!r}); reslab train does it for --init {scheme}), this one has branch "
                        f"{', '.join(sorted(kinds))}")
    return blocks


def _fixup(model: nn.Module, batch: Any) -> dict[int, Note]:
    """Zhang et al. 2019, Sec. 3: the branch's last conv 0, the others scaled by L^(-1/(2m-2))."""
    blocks = _blocks(model, "fixup", "fixup")
    num_branches = len(blocks)
    notes: dict[int, Note] = {}
    for block in blocks:
        m = block.layers_per_branch
        factor = num_branches ** (-1.0 / (2 * m - 2))
        convs = [getattr(block, name) for name in block._convs]
        for conv in convs[:-1]:
            conv.weight.mul_(factor)
            notes[id(conv.weight)] = Note(f"(fixup: L^(-1/{2 * m - 2}), L={num_branches})", scale=factor)
        nn.init.zeros_(convs[-1].weight)
        notes[id(convs[-1].weight)] = Note("zeros (fixup: last conv of the branch)", 0.0)
        for name, p in block.named_parameters(recurse=False):
            value = 1.0 if name == "scale" else 0.0
            p.fill_(value)
            notes[id(p)] = Note(f"{'ones' if value else 'zeros'} (fixup {'multiplier' if value else 'bias'})", 0.0)
    for name in ("bias1", "bias2"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.zero_()
            notes[id(p)] = Note("zeros (fixup bias)", 0.0)
    return notes


def _skipinit(model: nn.Module, batch: Any) -> dict[int, Note]:
    """De & Smith 2020: every branch's gain at 0, so each block starts as its shortcut."""
    notes = {}
    for block in _blocks(model, "skipinit", "skipinit"):
        block.skipinit_gain.zero_()
        notes[id(block.skipinit_gain)] = Note("zeros (skipinit gain)", 0.0)
    return notes


def _nf(model: nn.Module, batch: Any, alpha: float) -> dict[int, Note]:
    """Brock et al. 2021: Scaled WS convs start with gain 1 (the standardization sets the scale)."""
    from .convs import ScaledStdConv2d

    blocks = _blocks(model, "nf", f"nf:alpha={alpha:g}")
    if any(abs(b.alpha - alpha) > 1e-12 for b in blocks):
        raise SpecError(f"init 'nf:alpha={alpha:g}' needs a model built with alpha={alpha:g}; this one has "
                        f"alpha={blocks[0].alpha:g}")
    notes = {}
    for module in model.modules():
        if isinstance(module, ScaledStdConv2d):
            nn.init.ones_(module.gain)
            notes[id(module.gain)] = Note("ones (scaled WS gain)", 0.0)
    return notes


def _lsuv(model: nn.Module, batch: torch.Tensor, tol: float, max_iter: int) -> dict[int, Note]:
    """Mishkin & Matas 2016: the base policy's orthogonal weights, rescaled layer by layer."""
    from .convs import ScaledStdConv2d, StdConv2d

    layers = dict(model.named_modules())
    standardized = [path for path, m in layers.items() if isinstance(m, (StdConv2d, ScaledStdConv2d))]
    if standardized:
        raise SpecError(f"init 'lsuv' rescales weights, which weight standardization undoes ({standardized[0]} "
                        f"is a {type(layers[standardized[0]]).__name__}); use --conv default with lsuv")
    notes = {}
    for layer in lsuv_init(model, batch, tol=tol, max_iter=max_iter, orthogonal=False):
        weight = layers[layer.path].weight
        status = "" if layer.converged else ", not converged"
        notes[id(weight)] = Note(f"orthogonal + lsuv ({layer.iterations} rescale{'s' if layer.iterations != 1 else ''}"
                                 f"{status})", None, output_var=layer.variance)
    return notes


def _alpha(value: str) -> float:
    result = positive_float(value)
    if result > 1:
        raise ValueError("must be in (0, 1]")
    return result


_HE_RELU = "kaiming_normal:mode=fan_out,nonlinearity=relu"

MODEL_INITS = (
    ModelInit("fixup", "Fixup (Zhang et al. 2019): branch convs He x L^(-1/(2m-2)), last conv and classifier 0, "
                       "scalar biases and multipliers; made for --norm none on a residual ResNet (with a norm it "
                       "still builds: the norms undo the branch scaling, the zero last conv stays)",
              {}, {"conv": _HE_RELU, "linear": "zeros"}, _fixup, branch="fixup"),
    ModelInit("skipinit", "SkipInit (De & Smith 2020): He convs, a learnable scalar gain 0 at the end of each "
                          "residual branch; made for --norm none on a residual ResNet (with a norm it still builds)",
              {}, {"conv": _HE_RELU, "linear": "default"}, _skipinit, branch="skipinit"),
    ModelInit("nf", "NF-ResNet (Brock et al. 2021): x + alpha*f(relu(x)/beta), beta the expected std of the "
                    "block input, convs with scaled weight standardization; made for --norm none on a residual "
                    "ResNet (with a norm it still builds)",
              {"alpha": (_alpha, 0.2)}, {"conv": "kaiming_normal:nonlinearity=linear", "linear": "normal:std=0.01"},
              _nf, branch="nf", options=lambda alpha: {"alpha": alpha}),
    ModelInit("lsuv", "LSUV (Mishkin & Matas 2016): orthogonal, then each conv/linear rescaled until its output "
                      "variance on the first training batch is 1 within tol",
              {"tol": (to_float, DEFAULT_TOL), "max_iter": (to_int, DEFAULT_MAX_ITER)},
              {"conv": "orthogonal", "linear": "orthogonal"}, _lsuv, needs_batch=True, check=check_lsuv_args),
)


__all__ = ["MODEL_INITS", "ModelInit", "Note", "apply_model_init"]
