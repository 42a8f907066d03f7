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
A model without residual branches (plain nets, ``mlp``, ``simple_cnn``) cannot take them:
a SpecError says so.

**Your own residual blocks** (a model of your own, a timm or torchvision model) take
``zero_init_residual``, ``fixup`` and ``skipinit`` once each block declares its residual
branch with a method ``residual_branch(self) -> Sequence[nn.Module]``: the layers of the
branch in forward order (convs, norms, activations, ...), each a submodule of the block,
the last one's output being exactly what the block adds to its shortcut::

    class Block(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(channels)
            self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(channels)

        def residual_branch(self):
            return [self.conv1, self.bn1, self.conv2, self.bn2]

        def forward(self, x):
            return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))

* ``zero_init_residual`` (Goyal et al. 2017) calls each block's ``zero_init_last()``
  where it has one (timm's convention: timm's BasicBlock and Bottleneck do); otherwise it
  zeroes the scale of the declared branch's last layer when that is a norm with an
  affine weight.  reslab gives torchvision's BasicBlock/Bottleneck both methods
  (``tv:resnet*``); for timm's blocks, subclass them to add ``residual_branch()``.
* ``fixup`` and ``skipinit`` need scalars the block does not have.  :func:`attach_branch`
  adds them as parameters of each declared block (so they are in its ``state_dict`` and
  seen by the optimizer) and applies them with forward hooks on the declared layers;
  ``forward`` stays as written.  It runs once, right after the model is built and before
  ``init_weights``, and again, identically, on a model rebuilt to load saved weights.
  Fixup's branch convs are its ``nn.Conv1d/2d/3d`` and ``nn.Linear`` layers (at least 2):
  a scalar bias on the input of each (``bias1a``, ``bias2a``, ...), one on the output of
  each but the last (``bias1b``, ...: on the output of the norm that follows the conv in
  the branch, if one does, so before the activation, as in reslab's own blocks), and a
  multiplier ``scale`` and bias ``bias{m}b`` on the last layer's output; the shortcut
  does not see ``bias1a`` (in reslab's own blocks a projection shortcut does).  SkipInit
  multiplies the last layer's output by ``skipinit_gain``.  ``nf`` needs reslab's
  pre-activation blocks and is refused.

References: Zhang, Dauphin & Ma 2019 (arXiv 1901.09321); De & Smith 2020 (arXiv
2002.10444); Brock, De & Smith 2021 (arXiv 2101.08692); Mishkin & Matas 2016
(arXiv 1511.06422); Goyal et al. 2017 (arXiv 1706.02677).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import SpecError, choices_error
from .lsuv import DEFAULT_MAX_ITER, DEFAULT_TOL, check_lsuv_args, lsuv_init
from .norms import NORM_TYPES
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


# --- residual blocks that declare their branch ----------------------------------------

ATTACHABLE = ("fixup", "skipinit")  # the branches attach_branch adds to blocks that declare theirs
_ATTACHED = "_attached_branch"  # the attribute attach_branch marks a block with
_BRANCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # Fixup's "layers" of a branch


def _nf_refusal(label: str) -> SpecError:
    """The one-line refusal of ``nf`` for blocks that declare their branch: NF-ResNet changes the whole block."""
    return SpecError(f"init 'nf' cannot be attached to the blocks of {label}: it needs reslab's pre-activation "
                     "blocks (x + alpha*f(relu(x)/beta)); use reslab's ResNets (reslab list models) with --init nf")


def declares_branch(module: nn.Module) -> bool:
    """Whether ``module`` declares its residual branch: a callable ``residual_branch()``."""
    return callable(getattr(module, "residual_branch", None))


def declared_branch(block: nn.Module, where: str = "") -> list[nn.Module]:
    """``block.residual_branch()`` checked: distinct submodules of the block, at least one.

    ``where`` (the block's path) names it in the one-line SpecError.
    """
    layers = list(block.residual_branch())
    own = {id(m) for m in block.modules() if m is not block}
    name = where or type(block).__name__
    if not layers or any(not isinstance(m, nn.Module) or id(m) not in own for m in layers):
        raise SpecError(f"{name}.residual_branch() must return the layers of its residual branch in forward "
                        f"order, each a submodule of the block; got {[type(m).__name__ for m in layers]}")
    if len({id(m) for m in layers}) != len(layers):
        raise SpecError(f"{name}.residual_branch() lists a layer twice; list each layer of the branch once")
    return layers


class _ScalarHook:
    """``x * block.<scale> + block.<bias>`` (either may be None) on a branch layer's input (as a
    forward pre-hook) or output (as a forward hook).

    The scalars are looked up on the block at every call, so the hook follows the block
    through ``deepcopy``, ``to()``, ``load_state_dict(assign=True)`` and ``functional_call``.
    """

    def __init__(self, block: nn.Module, scale: str | None = None, bias: str | None = None):
        self.block, self.scale, self.bias = block, scale, bias

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * getattr(self.block, self.scale)
        if self.bias is not None:
            x = x + getattr(self.block, self.bias)
        return x

    def __call__(self, module: nn.Module, args: tuple[Any, ...], *output: Any) -> Any:
        if not output:  # a forward pre-hook: the layer's input
            return (self._apply(args[0]), *args[1:])
        return self._apply(output[0])


def _fixup_names(num_convs: int) -> list[str]:
    """Fixup's scalars of a branch of ``num_convs`` convs, in forward order (reslab's own blocks' names)."""
    names = []
    for i in range(1, num_convs + 1):
        names += [f"bias{i}a", f"bias{i}b"] if i < num_convs else [f"bias{i}a"]
    return [*names, "scale", f"bias{num_convs}b"]


def _branch_convs(layers: Sequence[nn.Module]) -> list[int]:
    return [i for i, layer in enumerate(layers) if isinstance(layer, _BRANCH_CONVS)]


def _check_attachable(block: nn.Module, path: str, layers: list[nn.Module], branch: str, label: str) -> list[str]:
    """The parameter names ``branch`` adds to ``block``; a one-line SpecError if it cannot take them."""
    where = path or "the model itself"
    if getattr(block, _ATTACHED, None):
        raise SpecError(f"{label}: {where} already has the {getattr(block, _ATTACHED)} branch attached; "
                        "attach_branch runs once per model, right after it is built")
    if branch == "skipinit":
        names = ["skipinit_gain"]
    else:
        num_convs = len(_branch_convs(layers))
        if num_convs < 2:
            raise SpecError(f"init 'fixup' needs at least 2 convs (Conv1d/2d/3d or Linear) in each residual "
                            f"branch, its scale L^(-1/(2m-2)) being undefined for m=1; {label}: {where} declares "
                            f"{num_convs} ({', '.join(type(m).__name__ for m in layers)})")
        names = _fixup_names(num_convs)
    for name in names:
        if hasattr(block, name):
            raise SpecError(f"{label}: {where} already has an attribute {name!r}, which init {branch!r} adds as "
                            "a parameter; rename it in the block")
    return names


def _attach(block: nn.Module, layers: list[nn.Module], branch: str, names: list[str]) -> None:
    """Register ``names`` on ``block`` (in forward order) and hook them onto ``layers``."""
    like = next(block.parameters(), torch.empty(()))
    for name in names:
        value = 1.0 if name == "scale" else 0.0
        block.register_parameter(name, nn.Parameter(torch.full((), value, dtype=like.dtype, device=like.device)))
    if branch == "skipinit":
        layers[-1].register_forward_hook(_ScalarHook(block, scale="skipinit_gain"))
    else:
        convs = _branch_convs(layers)
        for k, i in enumerate(convs, 1):
            layers[i].register_forward_pre_hook(_ScalarHook(block, bias=f"bias{k}a"))
            if k < len(convs):  # before the activation: after the conv's norm where the branch has one
                after = i + 1 if isinstance(layers[i + 1], NORM_TYPES) else i
                layers[after].register_forward_hook(_ScalarHook(block, bias=f"bias{k}b"))
        layers[-1].register_forward_hook(_ScalarHook(block, scale="scale", bias=f"bias{len(convs)}b"))
    setattr(block, _ATTACHED, branch)


def check_attachable(branch: str, label: str) -> None:
    """A one-line SpecError unless :func:`attach_branch` can add ``branch`` to declared blocks (``nf``
    cannot): checked before anything is built or written."""
    if branch == "nf":
        raise _nf_refusal(label)
    if branch not in ATTACHABLE:
        raise choices_error("branch to attach", branch, ATTACHABLE)


def attach_branch(model: nn.Module, branch: str, label: str) -> int:
    """Give every block of ``model`` that declares ``residual_branch()`` the scalars of ``branch``.

    ``branch``: ``fixup`` (Zhang, Dauphin & Ma 2019, Fig. 1: ``bias{i}a``, ``bias{i}b``,
    ``scale``) or ``skipinit`` (De & Smith 2020: ``skipinit_gain``), see the module
    docstring.  The scalars are parameters of each block, at their init values (biases and
    gain 0, ``scale`` 1), applied by forward hooks on the declared layers.  The same model
    gets the same parameter names every time, so a rebuilt model loads a saved
    ``state_dict`` strictly.  ``label`` names the model in errors.  Returns the number of
    blocks changed.  Every block is checked before any is changed; a SpecError (one line)
    for ``nf``, an unknown branch, a model without declared blocks, a fixup branch of
    fewer than 2 convs, a name the block already uses, or a model that already has
    a branch attached (attaching twice would apply the scalars twice).
    """
    check_attachable(branch, label)
    blocks = [(path, m, declared_branch(m, path)) for path, m in model.named_modules() if declares_branch(m)]
    if not blocks:
        raise SpecError(f"init {branch!r} needs residual blocks that declare their branch: give each block "
                        f"residual_branch() (see reslab.model_inits) — {label} has none")
    plans = [(block, layers, _check_attachable(block, path, layers, branch, label)) for path, block, layers in blocks]
    for block, layers, names in plans:
        _attach(block, layers, branch, names)
    return len(plans)


def _branch_kind(module: nn.Module) -> str | None:
    """The branch a residual block carries (``standard`` where none was added); None for other modules.

    reslab's own blocks say it (``branch_kind``); a block that declares ``residual_branch()``
    carries what :func:`attach_branch` attached.
    """
    from .models.resnet import _ResidualBlock

    if isinstance(module, _ResidualBlock):
        return module.branch_kind if module.residual else None
    if declares_branch(module):
        return getattr(module, _ATTACHED, None) or "standard"
    return None


def _blocks(model: nn.Module, branch: str, scheme: str) -> list[nn.Module]:
    from .models.resnet import _ResidualBlock

    blocks = [m for m in model.modules() if _branch_kind(m) is not None]
    if not blocks:
        raise SpecError(f"init {scheme!r} needs a model with residual branches; {type(model).__name__} has none "
                        "(or give its blocks residual_branch(): see reslab.model_inits)")
    kinds = {_branch_kind(b) for b in blocks}
    if kinds == {branch}:
        return blocks
    declared = [b for b in blocks if not isinstance(b, _ResidualBlock) and _branch_kind(b) != branch]
    if declared and branch in ATTACHABLE:
        raise SpecError(f"init {scheme!r} needs its scalars on the blocks that declare residual_branch(): call "
                        f"reslab.model_inits.attach_branch(model, {branch!r}, label) once the model is built "
                        f"({type(declared[0]).__name__} has branch {_branch_kind(declared[0])})")
    if declared and branch == "nf":
        raise _nf_refusal(type(model).__name__)
    raise SpecError(f"init {scheme!r} needs a model built with branch={branch!r} (build_model(..., "
                    f"branch={branch!r}); reslab train does it for --init {scheme}), this one has branch "
                    f"{', '.join(sorted(kinds))}")


def _fixup_convs(block: nn.Module) -> list[nn.Module]:
    """The convs of a Fixup block's branch, in order: reslab's own, or the declared branch's."""
    from .models.resnet import _ResidualBlock

    if isinstance(block, _ResidualBlock):
        return [getattr(block, name) for name in block._convs]
    layers = declared_branch(block)
    return [layers[i] for i in _branch_convs(layers)]


def _fixup_block(block: nn.Module, num_branches: int, notes: dict[int, Note]) -> None:
    """One block of Zhang et al. 2019, Sec. 3 (see :func:`_fixup`); notes by ``id(tensor)``."""
    convs = _fixup_convs(block)
    m = len(convs)
    factor = num_branches ** (-1.0 / (2 * m - 2))
    for conv in convs[:-1]:
        label = f"(fixup: L^(-1/{2 * m - 2}), L={num_branches})"
        if isinstance(conv, nn.Linear):  # the base's linear zeros are the classifier's: drawn as the convs
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            conv.weight.mul_(factor)
            he = math.sqrt(2.0 / conv.weight.shape[0])
            notes[id(conv.weight)] = Note(f"{_HE_RELU} x {factor:.4g} {label}", he * factor)
            continue
        conv.weight.mul_(factor)
        notes[id(conv.weight)] = Note(label, scale=factor)
    nn.init.zeros_(convs[-1].weight)
    notes[id(convs[-1].weight)] = Note("zeros (fixup: last conv of the branch)", 0.0)
    for name in _fixup_names(m):
        p, value = getattr(block, name), 1.0 if name == "scale" else 0.0
        p.fill_(value)
        notes[id(p)] = Note(f"{'ones' if value else 'zeros'} (fixup {'multiplier' if value else 'bias'})", 0.0)


def _fixup(model: nn.Module, batch: Any) -> dict[int, Note]:
    """Zhang et al. 2019, Sec. 3: in each of the L branches of m convs, the last conv 0, the others
    scaled by L^(-1/(2m-2)); the scalar biases 0 and multipliers 1.  reslab's own Fixup blocks and
    blocks given Fixup's scalars by :func:`attach_branch` alike."""
    blocks = _blocks(model, "fixup", "fixup")
    notes: dict[int, Note] = {}
    for block in blocks:
        _fixup_block(block, len(blocks), notes)
    for name in ("bias1", "bias2"):
        p = getattr(model, name, None)
        if isinstance(p, nn.Parameter):
            p.zero_()
            notes[id(p)] = Note("zeros (fixup bias)", 0.0)
    return notes


def _skipinit(model: nn.Module, batch: Any) -> dict[int, Note]:
    """De & Smith 2020: every branch's gain at 0, so each block starts as its shortcut (reslab's own
    SkipInit blocks and blocks given ``skipinit_gain`` by :func:`attach_branch` alike)."""
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


__all__ = ["ATTACHABLE", "MODEL_INITS", "ModelInit", "Note", "apply_model_init", "attach_branch", "check_attachable",
           "declared_branch", "declares_branch"]
