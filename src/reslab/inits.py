"""Weight initialization by spec string, applied to a whole model by a policy.

Every scheme is one registry entry that wraps a ``torch.nn.init`` function
(never a hand-rolled distribution) and knows the std its formula predicts, so
the report can set prediction against measurement for every tensor.

| scheme            | ``torch.nn.init``                  | arguments (defaults)                          |
|-------------------|------------------------------------|-----------------------------------------------|
| ``default``       | the layer's ``reset_parameters()`` |                                               |
| ``zeros``/``ones``| ``zeros_`` / ``ones_``             |                                               |
| ``constant``      | ``constant_``                      | ``val`` (required: ``constant:0.5``)          |
| ``uniform``       | ``uniform_``                       | ``a=0, b=1``                                  |
| ``normal``        | ``normal_``                        | ``mean=0, std=1``                             |
| ``trunc_normal``  | ``trunc_normal_``                  | ``mean=0, std=1, a=-2, b=2`` (absolute bounds)|
| ``xavier_*``      | Glorot & Bengio 2010               | ``gain=1``                                    |
| ``kaiming_*``     | He et al. 2015                     | ``a=0, mode=fan_in, nonlinearity=leaky_relu`` |
| ``orthogonal``    | Saxe et al. 2013                   | ``gain=1``                                    |
| ``dirac``         | ``dirac_`` (conv weights only)     |                                               |
| ``eye``           | ``eye_`` (linear weights only)     |                                               |
| ``sparse``        | Martens 2010                       | ``sparsity=0.1, std=0.01``                    |
| ``rule_uniform``  | ``uniform_(-1/sqrt(fan_in), +)``   |                                               |
| ``rule_normal``   | ``normal_(0, 1/sqrt(fan_in))``     |                                               |

A *policy* says what each kind of tensor gets.  ``init_weights(model,
"kaiming_normal:mode=fan_out")`` uses the scheme for conv and linear weights,
zeros for their biases (unless the scheme is ``default``), ones/zeros for norm
affines.  A mapping (from YAML) picks per kind::

    init: {conv: kaiming_normal:mode=fan_out, linear: normal:std=0.01,
           bias: zeros, norm: default, zero_init_residual: true}

Four schemes act on the whole model rather than on one tensor (:mod:`reslab.model_inits`):
``fixup``, ``skipinit`` and ``nf`` (norm-free residual nets: the model is built with
their residual branch) and ``lsuv`` (data-dependent: ``init_weights(model, "lsuv",
batch=x)``).  Each applies a per-tensor base policy first, then its model step; the
policy mapping's ``model`` key names one (``{model: lsuv:tol=0.05, linear: zeros}``).

Decisions worth knowing:

* ``gain`` is a positive number or a nonlinearity name: ``gain=relu`` means
  ``calculate_gain('relu')``; ``gain=leaky_relu`` uses PyTorch's default slope
  0.01 (for another slope give the number, or use ``kaiming_*:a=...``).
* Kaiming keeps PyTorch's defaults; ``nonlinearity=leaky_relu`` with ``a=0`` is
  the ReLU gain sqrt(2).
* ``sparse`` on a conv weight views it as the ``(out_channels, in_channels*k*k)``
  matrix the conv multiplies an unfolded input by, so the sparsity pattern is
  that of the equivalent linear layer.
* ``rule_*`` and ``default`` on a bias use the fan_in of the layer's weight, as
  ``reset_parameters`` does.
* Parameters the policy does not cover (embeddings, custom modules, conv
  transposes) keep their values; their report rows say ``untouched``.
* With ``seed`` (or ``generator``, from which one seed is drawn) everything runs
  under ``torch.random.fork_rng``: ``reset_parameters`` and ``sparse_`` (whose
  permutations ignore ``generator=``) are reproducible too, and the caller's
  CPU and CUDA generators are left as they were.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from .convs import CONV_TYPES
from .errors import SpecError
from .model_inits import MODEL_INITS, ModelInit, apply_model_init, declared_branch, declares_branch
from .norms import NORM_TYPES, has_affine_weight
from .registry import REQUIRED, Registry, Resolved
from .specs import Converter, one_of, parse_spec, positive_float, to_bool, to_float
from .tables import format_table

log = logging.getLogger(__name__)

KINDS = ("conv", "linear", "bias", "norm")
_KIND_LABELS = {"conv": "conv weights", "linear": "linear weights",
                "bias": "conv/linear biases", "norm": "norm scales"}
_ALL = frozenset(KINDS)
_WEIGHTS = frozenset({"conv", "linear"})
_FAN = frozenset({"conv", "linear", "bias"})  # schemes that need a fan_in

# The names torch.nn.init.calculate_gain accepts.
NONLINEARITIES = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                  "conv_transpose3d", "sigmoid", "tanh", "relu", "leaky_relu", "selu")


# --- argument converters ----------------------------------------------------

def _fraction(value: str) -> float:
    result = to_float(value)
    if not 0.0 <= result < 1.0:
        raise ValueError("must be in [0, 1)")
    return result


def _gain(value: str) -> float:
    """A positive number, or a nonlinearity name meaning ``calculate_gain(name)``."""
    if value in NONLINEARITIES:
        return nn.init.calculate_gain(value)
    try:
        return positive_float(value)
    except ValueError:
        raise ValueError(f"expected a positive number or one of {', '.join(NONLINEARITIES)}") from None


# --- the registry -------------------------------------------------------------

def fans(shape: tuple[int, ...]) -> tuple[int | None, int | None]:
    """``(fan_in, fan_out)`` as ``torch.nn.init`` computes them; None below 2-D."""
    if len(shape) < 2:
        return None, None
    receptive_field = math.prod(shape[2:])  # k*k for a conv, 1 for a linear
    return shape[1] * receptive_field, shape[0] * receptive_field


@dataclass(frozen=True)
class Target:
    """One parameter tensor and what a scheme needs to know about it."""

    tensor: torch.Tensor
    module: nn.Module
    name: str            # attribute of ``module``: "weight" or "bias"
    kind: str            # one of KINDS
    fan_in: int | None   # of the tensor; for a bias, of its layer's weight
    fan_out: int | None


@dataclass(frozen=True)
class InitEntry:
    name: str
    description: str
    params: dict[str, tuple[Converter, Any]]       # argument -> (converter, default or REQUIRED)
    apply: Callable[..., Any]                      # (target, **args): fills target.tensor via nn.init
    predict: Callable[..., float | None]           # (target, **args): the std the formula gives
    kinds: frozenset[str] = _ALL                   # tensor kinds the scheme makes sense for
    check: Callable[..., str | None] | None = None  # (**args): cross-argument problem, or None


@dataclass(frozen=True)
class Scheme:
    """A resolved spec: its registry entry and complete, typed arguments."""

    entry: InitEntry
    args: dict[str, Any]
    text: str

    def apply(self, target: Target) -> None:
        self.entry.apply(target, **self.args)

    def predict(self, target: Target) -> float | None:
        return self.entry.predict(target, **self.args)


# One registry for every init scheme: the per-tensor ones (InitEntry) and those that act
# on the whole model (ModelInit: fixup, skipinit, nf, lsuv), registered at the end of
# this module.
_REGISTRY: Registry[InitEntry | ModelInit] = Registry("init scheme")


def register_init(entry: InitEntry | ModelInit) -> InitEntry | ModelInit:
    return _REGISTRY.register(entry.name, entry)


def resolve_init(spec: str) -> Scheme:
    """Parse and validate one per-tensor scheme spec such as ``kaiming_normal:mode=fan_out``."""
    resolved = _REGISTRY.resolve(parse_spec(spec, "init spec"))
    if isinstance(resolved.entry, ModelInit):
        raise SpecError(f"init {resolved.text!r} initializes a whole model, not one kind of tensor; give it as "
                        f"the init itself (--init {resolved.text}) or as the policy's 'model' key")
    return Scheme(resolved.entry, resolved.args, resolved.text)


def is_model_init(spec: Any) -> bool:
    """Whether ``spec`` (an init string) names a whole-model scheme (fixup, skipinit, nf, lsuv)."""
    if not isinstance(spec, str):
        return False
    return isinstance(_REGISTRY.get(spec.partition(":")[0].strip()), ModelInit)


def resolve_model_init(spec: str) -> Resolved[ModelInit]:
    """Parse and check a whole-model scheme: ``fixup``, ``nf:alpha=0.2``, ``lsuv:tol=0.05,max_iter=20`` ..."""
    resolved = _REGISTRY.resolve(parse_spec(spec, "init spec"))
    if not isinstance(resolved.entry, ModelInit):
        raise SpecError(f"init {resolved.text!r} is not a whole-model scheme; valid choices: "
                        f"{', '.join(model_init_names())}")
    return resolved


def list_inits() -> dict[str, str]:
    """Every scheme name with a one-line description and its arguments; whole-model ones say so."""
    return {name: f"[whole model] {text}" if isinstance(_REGISTRY[name], ModelInit) else text
            for name, text in _REGISTRY.describe().items()}


def init_names() -> list[str]:
    """Every init name: the per-tensor schemes, then the whole-model ones (fixup, skipinit, nf, lsuv)."""
    return list(_REGISTRY)


def model_init_names() -> list[str]:
    """The whole-model schemes: fixup, skipinit, nf, lsuv."""
    return [name for name, entry in _REGISTRY.items() if isinstance(entry, ModelInit)]


def init_entry(name: str) -> InitEntry:
    entry = _REGISTRY.lookup(name)
    if isinstance(entry, ModelInit):
        raise SpecError(f"init {name!r} initializes a whole model, not one kind of tensor")
    return entry


# --- scheme implementations -------------------------------------------------

def _zero_std(t: Target, **_: Any) -> float:
    return 0.0


def _ones_std(ones: int, numel: int) -> float:
    """Exact (unbiased) std of a tensor of ``numel`` values, ``ones`` of them 1, the rest 0."""
    return math.sqrt(ones * (1 - ones / numel) / (numel - 1)) if numel > 1 else 0.0


def _default_apply(t: Target) -> None:
    """Re-run the layer's own ``reset_parameters()``, keeping its other parameters."""
    keep = {n: p.detach().clone() for n, p in t.module.named_parameters(recurse=False) if n != t.name}
    t.module.reset_parameters()
    with torch.no_grad():
        for n, saved in keep.items():
            getattr(t.module, n).copy_(saved)


def _default_std(t: Target) -> float | None:
    # Linear/ConvNd.reset_parameters: weight kaiming_uniform_(a=sqrt(5)), a gain of
    # sqrt(1/3), i.e. U(+-1/sqrt(fan_in)); bias U(+-1/sqrt(fan_in)) with the weight's fan_in.
    return 1 / math.sqrt(3 * t.fan_in) if t.fan_in else None


def _trunc_normal_std(t: Target, mean: float, std: float, a: float, b: float) -> float:
    alpha, beta = (a - mean) / std, (b - mean) / std
    pdf = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    mass = 0.5 * (math.erf(beta / math.sqrt(2)) - math.erf(alpha / math.sqrt(2)))
    var = 1 + (alpha * pdf(alpha) - beta * pdf(beta)) / mass - ((pdf(alpha) - pdf(beta)) / mass) ** 2
    return std * math.sqrt(var)


def _trunc_check(mean: float, std: float, a: float, b: float) -> str | None:
    if a >= b:
        return f"a={a:g} must be less than b={b:g}"
    if math.erf((b - mean) / std / math.sqrt(2)) - math.erf((a - mean) / std / math.sqrt(2)) < 1e-6:
        return f"[a, b] = [{a:g}, {b:g}] holds almost none of N({mean:g}, {std:g}^2)"
    return None


def _kaiming_std(t: Target, a: float, mode: str, nonlinearity: str) -> float:
    fan = t.fan_in if mode == "fan_in" else t.fan_out
    return nn.init.calculate_gain(nonlinearity, a) / math.sqrt(fan)


def _orthogonal_std(t: Target, gain: float) -> float:
    # (rows, cols) has min(rows, cols) orthonormal rows or columns: a squared sum of
    # gain^2 * min(rows, cols) spread over rows*cols entries.
    rows = t.tensor.shape[0]
    return gain / math.sqrt(max(rows, t.tensor.numel() // rows))


def _dirac_std(t: Target) -> float:
    out_channels, in_per_group = t.tensor.shape[:2]
    groups = t.module.groups
    return _ones_std(groups * min(out_channels // groups, in_per_group), t.tensor.numel())


def _sparse_apply(t: Target, sparsity: float, std: float) -> None:
    w = t.tensor
    if w.dim() == 2:
        nn.init.sparse_(w, sparsity, std)
        return
    flat = torch.empty(w.shape[0], w[0].numel(), dtype=w.dtype, device=w.device)  # (out, in*k*k)
    nn.init.sparse_(flat, sparsity, std)
    with torch.no_grad():
        w.copy_(flat.view_as(w))


def _sparse_std(t: Target, sparsity: float, std: float) -> float:
    rows = t.tensor.shape[0]
    return std * math.sqrt(1 - math.ceil(sparsity * rows) / rows)  # sparse_ zeroes ceil(s*rows) per column


def _rule_bound(t: Target) -> float:
    return 1 / math.sqrt(t.fan_in)


_GAIN = {"gain": (_gain, 1.0)}
_KAIMING = {"a": (to_float, 0.0), "mode": (one_of("fan_in", "fan_out"), "fan_in"),
            "nonlinearity": (one_of(*NONLINEARITIES), "leaky_relu")}


def _xavier_std(t: Target, gain: float) -> float:
    return gain * math.sqrt(2.0 / (t.fan_in + t.fan_out))


for _entry in (
    InitEntry("default", "the layer's own reset_parameters(): U(+-1/sqrt(fan_in)) for conv/linear",
              {}, _default_apply, _default_std, kinds=_FAN),
    InitEntry("zeros", "all zeros", {}, lambda t: nn.init.zeros_(t.tensor), _zero_std),
    InitEntry("ones", "all ones", {}, lambda t: nn.init.ones_(t.tensor), _zero_std),
    InitEntry("constant", "every value = val, e.g. constant:0.5", {"val": (to_float, REQUIRED)},
              lambda t, val: nn.init.constant_(t.tensor, val), _zero_std),
    InitEntry("uniform", "U(a, b)", {"a": (to_float, 0.0), "b": (to_float, 1.0)},
              lambda t, a, b: nn.init.uniform_(t.tensor, a, b),
              lambda t, a, b: (b - a) / math.sqrt(12),
              check=lambda a, b: None if a < b else f"a={a:g} must be less than b={b:g}"),
    InitEntry("normal", "N(mean, std^2)", {"mean": (to_float, 0.0), "std": (positive_float, 1.0)},
              lambda t, mean, std: nn.init.normal_(t.tensor, mean, std), lambda t, mean, std: std),
    InitEntry("trunc_normal", "N(mean, std^2) redrawn outside the absolute bounds [a, b]",
              {"mean": (to_float, 0.0), "std": (positive_float, 1.0), "a": (to_float, -2.0), "b": (to_float, 2.0)},
              lambda t, **kw: nn.init.trunc_normal_(t.tensor, **kw), _trunc_normal_std, check=_trunc_check),
    InitEntry("xavier_uniform", "Glorot & Bengio 2010: U(+-gain*sqrt(6/(fan_in+fan_out)))", _GAIN,
              lambda t, gain: nn.init.xavier_uniform_(t.tensor, gain), _xavier_std, kinds=_WEIGHTS),
    InitEntry("xavier_normal", "Glorot & Bengio 2010: N(0, gain^2*2/(fan_in+fan_out))", _GAIN,
              lambda t, gain: nn.init.xavier_normal_(t.tensor, gain), _xavier_std, kinds=_WEIGHTS),
    InitEntry("kaiming_uniform", "He et al. 2015: U(+-gain*sqrt(3/fan)), gain from nonlinearity and a", _KAIMING,
              lambda t, **kw: nn.init.kaiming_uniform_(t.tensor, **kw), _kaiming_std, kinds=_WEIGHTS),
    InitEntry("kaiming_normal", "He et al. 2015: N(0, gain^2/fan), gain from nonlinearity and a", _KAIMING,
              lambda t, **kw: nn.init.kaiming_normal_(t.tensor, **kw), _kaiming_std, kinds=_WEIGHTS),
    InitEntry("orthogonal", "Saxe et al. 2013: a (semi-)orthogonal matrix times gain", _GAIN,
              lambda t, gain: nn.init.orthogonal_(t.tensor, gain), _orthogonal_std, kinds=_WEIGHTS),
    InitEntry("dirac", "identity conv (same-size channels pass through), per group", {},
              lambda t: nn.init.dirac_(t.tensor, groups=t.module.groups), _dirac_std,
              kinds=frozenset({"conv"})),
    InitEntry("eye", "identity matrix (linear weights)", {}, lambda t: nn.init.eye_(t.tensor),
              lambda t: _ones_std(min(t.tensor.shape), t.tensor.numel()), kinds=frozenset({"linear"})),
    InitEntry("sparse", "Martens 2010: N(0, std^2) with a fraction sparsity of each column zero",
              {"sparsity": (_fraction, 0.1), "std": (positive_float, 0.01)}, _sparse_apply, _sparse_std,
              kinds=_WEIGHTS),
    InitEntry("rule_uniform", "general rule U(+-1/sqrt(fan_in))", {},
              lambda t: nn.init.uniform_(t.tensor, -_rule_bound(t), _rule_bound(t)),
              lambda t: _rule_bound(t) / math.sqrt(3), kinds=_FAN),
    InitEntry("rule_normal", "general rule N(0, 1/fan_in)", {},
              lambda t: nn.init.normal_(t.tensor, 0.0, _rule_bound(t)), _rule_bound, kinds=_FAN),
):
    register_init(_entry)
for _entry in MODEL_INITS:
    register_init(_entry)


# --- policy -------------------------------------------------------------------

@dataclass(frozen=True)
class InitPolicy:
    """What each kind of parameter tensor gets; every field is validated on construction."""

    conv: str = "default"             # scheme for Conv1d/2d/3d weights
    linear: str = "default"           # scheme for Linear weights
    bias: str | None = None           # conv/linear biases; None: "default" where the layer's weight is, else zeros
    norm: str = "default"             # norm scales; "default" = ones. Norm shifts always start at zero.
    # zero each residual branch's last norm scale (Goyal et al. 2017); None: as the model was
    # built (a ResNet built with zero_init_residual=True keeps those scales at zero)
    zero_init_residual: bool | None = None
    # a whole-model scheme applied after the per-tensor ones: fixup, skipinit, nf, lsuv (reslab.model_inits)
    model: str | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            if not isinstance(self.model, str) or not is_model_init(self.model):
                raise SpecError(f"init policy 'model' must be one of {', '.join(model_init_names())}, "
                                f"got {self.model!r}")
            resolve_model_init(self.model)
        for key in KINDS:
            value = getattr(self, key)
            if value is None and key == "bias":
                continue
            if not isinstance(value, str):
                raise SpecError(f"init policy {key!r} must be a scheme string, got {value!r}")
            if key == "norm" and value.strip() == "default":
                continue
            scheme = resolve_init(value)
            if key not in scheme.entry.kinds:
                valid = ", ".join(sorted(n for n, e in _REGISTRY.items() if key in getattr(e, "kinds", ())))
                hint = (f"; give a policy mapping to choose it for {', '.join(sorted(scheme.entry.kinds))} only, "
                        f"e.g. {{'{min(scheme.entry.kinds)}': '{value}'}}" if key in _WEIGHTS else "")
                raise SpecError(f"init scheme {value!r} cannot initialize {_KIND_LABELS[key]}; "
                                f"valid choices for {_KIND_LABELS[key]}: {valid}{hint}")
        if self.zero_init_residual is not None and not isinstance(self.zero_init_residual, bool):
            raise SpecError(f"init policy 'zero_init_residual' must be true or false, got {self.zero_init_residual!r}")


POLICY_KEYS = tuple(f.name for f in fields(InitPolicy))


def needs_batch(spec: str | Mapping[str, Any] | InitPolicy | None) -> bool:
    """Whether the init ``spec`` needs training inputs (``lsuv``)."""
    policy = parse_policy(spec)
    return policy.model is not None and resolve_model_init(policy.model).entry.needs_batch


def parse_policy(spec: str | Mapping[str, Any] | InitPolicy | None = "default") -> InitPolicy:
    """A policy from a scheme string (for conv and linear weights) or a mapping with POLICY_KEYS."""
    if isinstance(spec, InitPolicy):
        return spec
    if spec is None:
        return InitPolicy()
    if isinstance(spec, str):
        if is_model_init(spec):
            return InitPolicy(model=spec.strip(), **resolve_model_init(spec).entry.base)
        return InitPolicy(conv=spec, linear=spec)
    if not isinstance(spec, Mapping):
        raise SpecError(f"init policy must be a scheme string or a mapping with keys "
                        f"{', '.join(POLICY_KEYS)}; got {type(spec).__name__}")
    for key in spec:
        if key not in POLICY_KEYS:
            raise SpecError(f"unknown init policy key {key!r}; valid keys: {', '.join(POLICY_KEYS)}")
    values = {key: value for key, value in spec.items() if value is not None}  # YAML null = default
    if isinstance(values.get("model"), str) and is_model_init(values["model"]):
        # the scheme's base policy, where the mapping does not say otherwise
        values = {**resolve_model_init(values["model"]).entry.base, **values}
    if isinstance(values.get("zero_init_residual"), str):
        try:
            values["zero_init_residual"] = to_bool(values["zero_init_residual"])
        except ValueError:
            raise SpecError(f"bad value {spec['zero_init_residual']!r} for init policy 'zero_init_residual': "
                            "expected true or false") from None
    return InitPolicy(**values)


# --- report -------------------------------------------------------------------

@dataclass(frozen=True)
class InitRow:
    path: str                     # module path + ".weight" / ".bias"
    kind: str                     # conv | linear | bias | norm | other
    shape: tuple[int, ...]
    fan_in: int | None            # None for 1-D tensors
    fan_out: int | None
    scheme: str                   # spec text applied, or "untouched"
    std_predicted: float | None   # what the scheme's formula gives; None where none does
    std_measured: float
    output_var: float | None = None  # LSUV: the layer's output variance on the batch, after init


def _sig(value: float | int | None) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class InitReport:
    rows: list[InitRow]
    policy: InitPolicy
    seed: int | None = None  # the seed used (drawn from the generator if one was given)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[InitRow]:
        return iter(self.rows)

    def __repr__(self) -> str:
        return f"InitReport({len(self.rows)} tensors, policy={self.policy}, seed={self.seed})"

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per row (shape as a list, so YAML and JSON take it)."""
        return [{**asdict(row), "shape": list(row.shape)} for row in self.rows]

    def format_table(self) -> str:
        """An aligned text table, one line per tensor; stds to 4 significant digits."""
        header = ["path", "kind", "shape", "fan_in", "fan_out", "scheme", "std_pred", "std_meas"]
        cells = [[r.path, r.kind, "x".join(map(str, r.shape)) or "()", _sig(r.fan_in), _sig(r.fan_out),
                  r.scheme, _sig(r.std_predicted), _sig(r.std_measured)] for r in self.rows]
        right = [False, False, False, True, True, False, True, True]  # numbers align right
        if any(r.output_var is not None for r in self.rows):  # LSUV: each layer's final output variance
            header.append("out_var")
            for row, r in zip(cells, self.rows, strict=True):
                row.append(_sig(r.output_var))
            right.append(True)
        return format_table(header, cells, right=right)

    def __str__(self) -> str:
        return self.format_table()


# --- applying a policy to a model -------------------------------------------

def _assign(module: nn.Module, name: str, policy: InitPolicy, resolve: Callable[[str], Scheme]
            ) -> tuple[str, str | None]:
    """(kind, scheme text) for parameter ``name`` of ``module``; text None = untouched."""
    layer = ("conv" if isinstance(module, CONV_TYPES) else "linear" if isinstance(module, nn.Linear)
             else "norm" if isinstance(module, NORM_TYPES) else None)
    if layer in _WEIGHTS:
        if name == "weight":
            return layer, getattr(policy, layer)
        if name == "bias":
            own_default = resolve(getattr(policy, layer)).entry.name == "default"
            return "bias", policy.bias or ("default" if own_default else "zeros")
    if layer == "norm":
        if name == "weight":
            return "norm", "ones" if policy.norm.strip() == "default" else policy.norm
        if name == "bias":
            return "norm", "zeros"
    return "other", None


@contextmanager
def _seeded(model: nn.Module, seed: int | None, generator: torch.Generator | None) -> Iterator[int | None]:
    """Run the body from ``seed`` without disturbing the caller's CPU and CUDA generators."""
    if generator is not None:
        if seed is not None:
            raise SpecError("init_weights takes seed or generator, not both")
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
    if seed is None:
        yield None
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"init seed must be an integer, got {seed!r}")
    cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        # Seed only the generators in play: torch.manual_seed would also queue a lazy
        # seed for CUDA that lands on the caller's generator once CUDA starts.
        torch.random.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield seed


def wants_zero_init_residual(model: nn.Module, policy: InitPolicy) -> bool:
    """Whether ``policy`` on ``model`` zeroes the residual branches' last norms.

    The policy decides where it says so; otherwise the model does (a ResNet
    built with ``zero_init_residual=True`` records it).  A policy that says
    false on a model built with it is a contradiction, not a choice.
    """
    built_with = bool(getattr(model, "zero_init_residual", False))
    if policy.zero_init_residual is False and built_with:
        raise SpecError("init policy says zero_init_residual: false, but the model was built with "
                        "zero_init_residual=True; drop one of the two")
    return built_with if policy.zero_init_residual is None else policy.zero_init_residual


def _zero_declared_last(block: nn.Module) -> None:
    """Zero the scale of the last layer of ``block.residual_branch()`` when it is a norm with an affine weight."""
    last = declared_branch(block)[-1]
    if isinstance(last, NORM_TYPES) and has_affine_weight(last):
        nn.init.zeros_(last.weight)


def _zero_init_residual(model: nn.Module) -> set[int]:
    """Zero the last norm scale of every residual branch; ids of the tensors it wrote.

    Goyal et al. 2017 (arXiv 1706.02677): with the last norm of each residual
    branch at zero, every block starts as the identity.  A block that has a callable
    ``zero_init_last()`` (timm's convention; reslab's and torchvision's blocks have
    it too) is asked to do it; one that instead declares ``residual_branch()``
    (:mod:`reslab.model_inits`) has the scale of its branch's last layer zeroed when
    that layer is a norm with an affine weight.  A tensor counts as written if its
    version counter moved or its values changed.  A model where nothing can be
    zeroed (no such blocks, or branches that end without a norm scale) is a
    SpecError: asking for it and silently getting nothing would record a run that
    is not the one named.
    """
    blocks = [m for m in model.modules() if callable(getattr(m, "zero_init_last", None)) or declares_branch(m)]
    written: set[int] = set()
    for block in blocks:
        before = {id(p): (p._version, p.detach().clone()) for p in block.parameters()}
        if callable(getattr(block, "zero_init_last", None)):
            block.zero_init_last()
        else:
            _zero_declared_last(block)
        for p in block.parameters():
            version, saved = before.get(id(p), (None, None))
            if saved is None or p._version != version or not torch.equal(p.detach(), saved):
                written.add(id(p))
    if not written:
        raise SpecError(f"zero_init_residual: {type(model).__name__} has no residual branch ending in a norm "
                        "with a scale to zero (a plain net, blocks without zero_init_last() or residual_branch(), "
                        "or norm 'none'); give each residual block zero_init_last() or residual_branch() ending "
                        "in its last norm (see reslab.model_inits)")
    return written


def init_weights(model: nn.Module, spec: str | Mapping[str, Any] | InitPolicy = "default", *,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 batch: torch.Tensor | None = None) -> InitReport:
    """Initialize every parameter of ``model`` by the policy ``spec``; one report row per tensor.

    ``spec`` is a scheme string for conv and linear weights (biases zero unless
    it is ``default``; norm scales one, shifts zero), a whole-model scheme
    (``fixup``, ``skipinit``, ``nf``, ``lsuv``; :mod:`reslab.model_inits`) or a policy
    mapping, see :class:`InitPolicy`.  ``batch``: training inputs, for ``lsuv``.
    With ``seed`` or ``generator`` the result is reproducible and the global RNG
    is left untouched.
    """
    policy = parse_policy(spec)
    cache: dict[str, Scheme] = {}

    def resolve(text: str) -> Scheme:
        if text not in cache:
            cache[text] = resolve_init(text)
        return cache[text]

    plan: list[tuple[str, Target, str | None]] = []
    seen: set[int] = set()
    for module_path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tensor shared between modules is initialized once
                continue
            seen.add(id(p))
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise SpecError(f"parameter {module_path}.{name} is lazy; run one forward pass before init_weights")
            kind, text = _assign(module, name, policy, resolve)
            fan_in, fan_out = fans(tuple(module.weight.shape) if kind == "bias" else tuple(p.shape))
            plan.append((f"{module_path}.{name}" if module_path else name,
                         Target(p, module, name, kind, fan_in, fan_out), text))

    with _seeded(model, seed, generator) as used_seed:
        for _, target, text in plan:
            if text is not None:
                resolve(text).apply(target)
        zeroed = _zero_init_residual(model) if wants_zero_init_residual(model, policy) else set()
        notes = apply_model_init(model, resolve_model_init(policy.model), batch) if policy.model else {}

    rows = []
    for path, t, text in plan:
        predicted = resolve(text).predict(t) if text is not None else None
        if id(t.tensor) in zeroed:
            text, predicted = "zeros (zero_init_residual)", 0.0
        note = notes.get(id(t.tensor))
        if note is not None and note.scale is not None:
            text = f"{text} x {note.scale:.4g} {note.scheme}"
            predicted = None if predicted is None else predicted * note.scale
        elif note is not None:
            text, predicted = note.scheme, note.predicted
        shape = tuple(t.tensor.shape)
        measured = float(t.tensor.detach().float().std()) if t.tensor.numel() > 1 else 0.0
        rows.append(InitRow(path, t.kind, shape, *fans(shape), text or "untouched", predicted, measured,
                            None if note is None else note.output_var))
    return InitReport(rows, policy, used_seed)


__all__ = [
    "KINDS", "NONLINEARITIES", "POLICY_KEYS", "InitEntry", "InitPolicy", "InitReport", "InitRow",
    "Scheme", "Target", "fans", "init_entry", "init_names", "init_weights", "is_model_init", "list_inits",
    "model_init_names", "parse_policy", "register_init", "resolve_init", "resolve_model_init",
    "wants_zero_init_residual",
]
