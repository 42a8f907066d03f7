"""A study's claim as checks over its own runs, judged by statistical inference.

A claim is written as one or more *checks*, each a comparison of expressions
over the statistics of the study's groups, e.g. (Wu & He 2018, Fig. 1)::

    (1 - mean(norm="bn:ghost=2")) / (1 - mean(norm="bn:ghost=32")) >= 1.3
    abs(mean(norm="gn", warmup_epochs=2) - mean(norm="bn", warmup_epochs=2)) < 0.05
    frac(norm="none", warmup_epochs=0, below=0.5, diverged=True) > 0.5

The expression language (parsed with :mod:`ast`, never ``eval``):

| term | value |
|---|---|
| ``mean(field=value, ...)`` | mean of the study's metric over the completed runs of the group |
| ``std(field=value, ...)`` | their sample std (ddof=1) |
| ``frac(..., below=T)`` / ``frac(..., above=T)`` | the share of the group's runs whose metric is below / above T |
| ``frac(..., below=T, diverged=True)`` | the same, a run that did not complete counting as meeting the condition |
| ``frac(..., status="diverged")`` | the share of the group's runs that ended so (completed, diverged, failed) |
| ``diverged(...)``, ``failed(...)``, ``completed(...)``, ``n(...)`` | exact run counts in the group |
| ``mean(..., metric="final_train_loss")`` | another number of ``summary.json`` (also for ``std`` and ``frac``) |
| numbers, ``+ - * /``, ``abs()``, ``min()``, ``max()`` | arithmetic |
| ``<  <=  >  >=`` | a comparison (one per check, chained, or joined with ``and`` / ``or`` / ``not``) |

A group is selected by the config fields it names; fields left out pool over
their values (``mean(norm="bn")`` is every BN run).  Accuracies are fractions.
The runs are :class:`reslab.rundir.Run` records: a check reads each run's config
(``run.value(field)``), its status and its ``summary.json``.

How a check is judged, at the study's confidence C (default 0.95):

- Each comparison ``L > R`` is a claim about the gap ``G = L - R``.  Its
  estimate is the gap at the group means; its standard error comes from the
  groups' sample variances: exactly for sums and differences of means (Welch's
  t with Welch-Satterthwaite degrees of freedom), by the delta method (first
  order, same degrees of freedom) for products and ratios.  A study with
  ``paired: true`` compares groups that share their seeds through per-seed
  differences (a paired t over the seeds) instead.
- The comparison *holds* when the whole two-sided C confidence interval of the
  gap lies on the claimed side, *fails* when it lies wholly on the other side,
  and is undecided otherwise.  Each verdict therefore errs in at most
  (1 - C) / 2 of repeats when the gap sits exactly at the threshold.
- ``min``, ``max`` and ``abs`` are exact rules over comparisons:
  ``min(a, b) > t`` is ``a > t and b > t``, ``max(a, b) > t`` is
  ``a > t or b > t``, ``abs(d) < t`` is ``d < t and d > -t`` (equivalence as
  two one-sided tests, TOST).  Joined comparisons keep the confidence:
  ``and`` holds when every part holds (an intersection-union test, no
  correction needed) and fails when one part fails after a Bonferroni
  correction over its parts; ``or`` the other way round.
- A proportion (``frac``) compared with a number is an exact binomial test with
  a Clopper-Pearson interval; inside arithmetic with other terms it enters with
  the Agresti-Coull variance (a normal approximation).
- Counts are exact: a comparison of counts alone holds or fails outright.
- A group with one completed run has no spread, so any comparison that needs
  its spread is undecided; so is one over a group whose runs did not all
  finish (the runs that did not finish would decide it - compare their
  share with ``frac`` instead).

The claim is *supported* when every check holds, *not supported* when a check
fails after Holm's correction across the checks (so the chance of wrongly
calling a true claim unsupported stays below (1 - C) / 2 however many checks
there are), and *inconclusive* otherwise.  Each undecided check says about how
many seeds per group would decide it at 80% power, if the effect and spread
observed are the true ones (``seeds_needed``).
"""

from __future__ import annotations

import ast
import copy
import functools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import SpecError

if TYPE_CHECKING:  # (only a type here: the verdict reads runs, and every command imports it cheaply)
    from .rundir import Run

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
HOLDS, FAILS, UNKNOWN = "holds", "fails", "inconclusive"
COUNTS = ("diverged", "failed", "completed", "n")
STATUSES = ("completed", "diverged", "failed")
DEFAULT_METRIC = "final_eval_acc"
DEFAULT_CONFIDENCE = 0.95
POWER = 0.8  # the power seeds_needed plans for (Cohen's convention)
MAX_SEEDS = 1000  # seeds_needed beyond this is reported as None: the effect is too small to chase


@functools.cache
def _stats():
    """scipy.stats, imported on first use: it takes about a second, and every reslab command imports this
    module (the CLI lists the studies, which validate their checks), while few judge a claim."""
    from scipy import stats

    return stats


def check_confidence(confidence: Any, where: str = "confidence") -> float:
    """``confidence`` as a float in (0.5, 1); a SpecError naming it otherwise."""
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or \
            not 0.5 < float(confidence) < 1:
        raise SpecError(f"{where} must be a number between 0.5 and 1 (e.g. 0.95 for 95%), got {confidence!r}")
    return float(confidence)


# --- parsing ---------------------------------------------------------------------------

_GROUP_TERMS = ("mean", "std", "frac", *COUNTS)
_FUNCTIONS = (*_GROUP_TERMS, "abs", "min", "max")
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_FRAC_OPTIONS = ("below", "above", "status", "diverged")
_ALLOWED = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp,
            ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Constant, ast.Name, ast.Load, ast.Call, ast.keyword,
            ast.Compare, *_COMPARE)


def _check_group_call(text: str, name: str, node: ast.Call, known: set[str] | None) -> None:
    if node.args:
        raise SpecError(f"verdict check {text!r}: {name}() selects a group by keywords, e.g. {name}(norm=\"bn\")")
    options = {}
    for kw in node.keywords:
        if kw.arg is None or not isinstance(kw.value, ast.Constant):
            hint = (f" (quote text values: {kw.arg}=\"{kw.value.id}\")" if isinstance(kw.value, ast.Name) else "")
            raise SpecError(f"verdict check {text!r}: {name}() takes field=constant keywords{hint}")
        value = kw.value.value
        if kw.arg == "metric":
            if name not in ("mean", "std", "frac") or not isinstance(value, str):
                raise SpecError(f"verdict check {text!r}: metric= is a summary field name, for mean(), std() "
                                "and frac()")
        elif name == "frac" and kw.arg in _FRAC_OPTIONS:
            options[kw.arg] = value
        elif known is not None and kw.arg not in known:
            raise SpecError(f"verdict check {text!r}: {kw.arg!r} is not a field the study sets "
                            f"(its grid or base); valid: {', '.join(sorted(known)) or 'none'}")
    if name != "frac":
        return
    conditions = [k for k in ("below", "above", "status") if k in options]
    if len(conditions) != 1:
        raise SpecError(f"verdict check {text!r}: frac() takes exactly one of below=T, above=T or "
                        f"status=\"diverged\" (got {', '.join(conditions) or 'none'})")
    for key in ("below", "above"):
        if key in options and (isinstance(options[key], bool) or not isinstance(options[key], (int, float))):
            raise SpecError(f"verdict check {text!r}: frac({key}=...) takes a number, got {options[key]!r}")
    if "status" in options and options["status"] not in STATUSES:
        raise SpecError(f"verdict check {text!r}: frac(status={options['status']!r}): valid: {', '.join(STATUSES)}")
    if "diverged" in options and (not isinstance(options["diverged"], bool) or "status" in options):
        raise SpecError(f"verdict check {text!r}: frac(diverged=True|False) says whether a run that did not "
                        "complete meets below=/above=")


def parse_check(text: str, grid_fields: Iterable[str] | None = None) -> ast.Expression:
    """Parse and validate one check; a SpecError names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise SpecError(f"a verdict check must be a non-empty expression, got {text!r}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise SpecError(f"verdict check {text!r} is not a valid expression: {exc.msg}") from None
    except (UnicodeError, ValueError):  # a lone surrogate cannot be encoded; a NUL byte is refused
        raise SpecError(f"verdict check {text!r} is not a valid expression: it holds characters Python "
                        "source cannot") from None
    known = set(grid_fields) if grid_fields is not None else None
    has_comparison = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            has_comparison = True
            for op in node.ops:
                if type(op) not in _COMPARE:
                    raise SpecError(f"verdict check {text!r}: only < <= > >= compare; got {type(op).__name__}")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in _FUNCTIONS:
                raise SpecError(f"verdict check {text!r}: unknown function {ast.unparse(node.func)!r}; "
                                f"valid: {', '.join(_FUNCTIONS)}")
            if name in _GROUP_TERMS:
                _check_group_call(text, name, node, known)
            elif node.keywords or not node.args or (name == "abs" and len(node.args) != 1):
                raise SpecError(f"verdict check {text!r}: {name}() takes positional numbers"
                                + (" (one)" if name == "abs" else ""))
        elif isinstance(node, ast.Name) and node.id not in _FUNCTIONS:
            raise SpecError(f"verdict check {text!r}: unknown name {node.id!r} (quote text values: norm=\"bn\")")
        elif isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str)):
            raise SpecError(f"verdict check {text!r}: {node.value!r} is not a number")
        elif not isinstance(node, _ALLOWED):
            raise SpecError(f"verdict check {text!r}: {type(node).__name__} is not allowed")
    if not has_comparison:
        raise SpecError(f"verdict check {text!r} compares nothing; write e.g. mean(norm=\"bn\") >= 0.9")
    _formula(tree.body, text)  # min/max/abs must sit where an exact rule applies
    return tree


# --- checks as formulas of comparisons -------------------------------------------------------
# A check becomes a tree of And/Or/Not over comparisons ``left > right`` (or >=) whose sides are
# free of min/max/abs: those are rewritten into the tree by the rules in the module docstring.


@dataclass
class _Leaf:
    left: ast.expr  # the side the claim says is larger
    right: ast.expr
    strict: bool
    flipped: bool = False  # written as right < left

    @property
    def text(self) -> str:
        left, right = ast.unparse(self.left), ast.unparse(self.right)
        if self.flipped:
            return f"{right} {'<' if self.strict else '<='} {left}"
        return f"{left} {'>' if self.strict else '>='} {right}"

    def shown(self, gap: float, interval: tuple[float, float] | None) -> str:
        """The comparison as written, with its measured side's estimate and interval against the other side."""
        first, second = (self.right, self.left) if self.flipped else (self.left, self.right)
        sign = -1.0 if self.flipped else 1.0  # first - second = sign * gap
        diff = sign * gap
        span = None if interval is None else sorted((sign * interval[0], sign * interval[1]))
        if _is_exact_number(second):  # first - plain = diff
            plain = _plain_value(second, "")
            rng = None if span is None else [x + plain for x in span]
            return f"{ast.unparse(first)} = {_interval_text(diff + plain, rng)} vs {_num(plain)}"
        if _is_exact_number(first):  # plain - second = diff
            plain = _plain_value(first, "")
            rng = None if span is None else sorted(plain - x for x in span)
            return f"{ast.unparse(second)} = {_interval_text(plain - diff, rng)} vs {_num(plain)}"
        return f"{ast.unparse(first)} - ({ast.unparse(second)}) = {_interval_text(diff, span)} vs 0"


@dataclass
class _Node:
    op: str  # and | or | not
    children: list[Any]


def _formula(node: ast.AST, text: str) -> _Leaf | _Node:
    if isinstance(node, ast.BoolOp):
        return _Node("and" if isinstance(node.op, ast.And) else "or", [_formula(v, text) for v in node.values])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _Node("not", [_formula(node.operand, text)])
    if isinstance(node, ast.Compare):
        parts, left = [], node.left
        for op, right in zip(node.ops, node.comparators, strict=True):
            symbol = _COMPARE[type(op)]
            big, small = (left, right) if symbol in (">", ">=") else (right, left)
            parts.append(_expand(_Leaf(big, small, symbol in (">", "<"), symbol in ("<", "<=")), text))
            left = right
        return parts[0] if len(parts) == 1 else _Node("and", parts)
    raise SpecError(f"verdict check {text!r}: {ast.unparse(node)!r} is not a comparison")


@functools.lru_cache(maxsize=512)
def _compiled(text: str) -> _Leaf | _Node:
    """A check's formula, parsed and checked once per text (the formula is only read, never changed)."""
    return _formula(parse_check(text).body, text)


def _is_exact_number(node: ast.AST) -> bool:
    return not any(isinstance(n, ast.Call) for n in ast.walk(node))


def _find_choice(node: ast.AST, sign: int, text: str) -> tuple[ast.Call, int] | None:
    """The first min/max/abs call under ``node`` and the sign of the gap's slope in it.

    Only +, - and scaling by a plain number keep the slope's sign known; a choice
    under any other operation cannot be turned into an exact rule.
    """
    if isinstance(node, ast.Call):
        return (node, sign) if node.func.id in ("min", "max", "abs") else None
    if isinstance(node, ast.UnaryOp):
        return _find_choice(node.operand, -sign if isinstance(node.op, ast.USub) else sign, text)
    if not isinstance(node, ast.BinOp):
        return None
    if isinstance(node.op, (ast.Add, ast.Sub)):
        found = _find_choice(node.left, sign, text)
        return found or _find_choice(node.right, -sign if isinstance(node.op, ast.Sub) else sign, text)
    for inner, other in ((node.left, node.right), (node.right, node.left)):
        found = _find_choice(inner, sign, text)
        if found is None:
            continue
        if not _is_exact_number(other) or (isinstance(node.op, ast.Div) and inner is node.right):
            raise SpecError(f"verdict check {text!r}: {ast.unparse(found[0])} sits in a product or quotient "
                            "with a measured value; compare each term instead (min(a, b) / c > t as "
                            "a / c > t and b / c > t)")
        factor = _plain_value(other, text)
        return found[0], found[1] * (1 if factor > 0 else -1 if factor < 0 else 0)
    return None


def _plain_value(node: ast.AST, text: str) -> float:
    """The value of an expression of plain numbers."""
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.UnaryOp):
        inner = _plain_value(node.operand, text)
        return -inner if isinstance(node.op, ast.USub) else inner
    left, right = _plain_value(node.left, text), _plain_value(node.right, text)
    if isinstance(node.op, ast.Div):
        if right == 0:
            raise SpecError(f"verdict check {text!r}: divides by zero")
        return left / right
    return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]


def _replace(tree: ast.expr, target: ast.AST, new: ast.expr) -> ast.expr:
    """A copy of ``tree`` with the node ``target`` (found by identity) replaced by a copy of ``new``."""
    if tree is target:
        return copy.deepcopy(new)
    out = copy.copy(tree)
    for name, value in ast.iter_fields(tree):
        if isinstance(value, ast.AST):
            setattr(out, name, _replace(value, target, new))
        elif isinstance(value, list):
            setattr(out, name, [_replace(v, target, new) if isinstance(v, ast.AST) else v for v in value])
    return out


def _expand(leaf: _Leaf, text: str) -> _Leaf | _Node:
    """Rewrite min/max/abs out of ``leaf`` (claim: left - right > 0) into And/Or of comparisons."""
    for side, sign in (("left", 1), ("right", -1)):
        found = _find_choice(getattr(leaf, side), sign, text)
        if found is None:
            continue
        call, slope = found
        options = list(call.args) if call.func.id != "abs" else \
            [call.args[0], ast.UnaryOp(op=ast.USub(), operand=call.args[0])]
        takes_max = call.func.id != "min"
        # gap(max(x)) = max(gap(x)) when the gap rises with the choice: > 0 when any is (or);
        # gap(min(x)) = min(gap(x)): > 0 when all are (and); a falling gap swaps the two.
        op = "or" if takes_max == (slope > 0) else "and"
        children = []
        for option in options:
            part = _Leaf(leaf.left, leaf.right, leaf.strict, leaf.flipped)
            setattr(part, side, _replace(getattr(leaf, side), call, option))
            children.append(_expand(part, text))
        return _Node(op, children)
    return leaf


# --- group statistics ----------------------------------------------------------------------------


def run_field(run: Run, name: str) -> Any:
    """The config field ``name`` of ``run``; None for a name no config has (a check may name any field)."""
    try:
        return run.value(name)
    except AttributeError:
        return None


def matches_value(value: Any, wanted: Any) -> bool:
    if value == wanted:
        return True
    try:  # 32 vs "32", 0.1 vs "0.1": grid values may come from text
        return str(value) == str(wanted) or float(value) == float(wanted)
    except (TypeError, ValueError):
        return False


@dataclass(eq=False)  # terms key dicts by identity
class Term:
    """One group statistic a check reads: its estimate and the sampling spread behind it."""

    label: str
    kind: str  # mean | std | frac | count
    estimate: float
    runs: int  # runs in the group
    n: int  # the runs the estimate averages (completed runs for mean/std, all runs for frac)
    values: list[float] = field(default_factory=list)  # per run (mean/std), 0/1 per run (frac)
    seeds: list[Any] = field(default_factory=list)  # the seed of each of ``values``
    why: str = ""  # non-empty: undefined, and why

    @property
    def defined(self) -> bool:
        return not self.why

    @property
    def sample_variance(self) -> float:
        """The runs' sample variance (ddof=1), in floating point (statistics.variance is exact and slow)."""
        mean = math.fsum(self.values) / len(self.values)
        return math.fsum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1)

    def variance(self) -> tuple[float, float]:
        """The sampling variance of the estimate and its degrees of freedom (inf: exact or normal)."""
        if self.kind == "count":
            return 0.0, math.inf
        if self.kind == "frac":  # Agresti-Coull: never zero at 0/n or n/n
            k = sum(self.values)
            p = (k + 2) / (self.n + 4)
            return p * (1 - p) / (self.n + 4), math.inf
        if self.kind == "mean":
            return self.sample_variance / self.n, self.n - 1
        return self.sample_variance / (2 * (self.n - 1)), self.n - 1  # std: the delta method on s^2's chi-square

    def per_run_variance(self) -> float | None:
        if self.kind == "mean" and self.n > 1:
            return self.sample_variance
        if self.kind == "frac":
            p = (sum(self.values) + 2) / (self.n + 4)
            return p * (1 - p)
        return None

    def describe(self, confidence: float) -> str:
        if not self.defined:
            return f"undefined ({self.why})"
        if self.kind == "count":
            return _num(self.estimate)
        if self.kind == "frac":
            lo, hi = _clopper_pearson(int(sum(self.values)), self.n, confidence)
            return f"{int(sum(self.values))}/{self.n} = {_num(self.estimate)} [{_num(lo)}, {_num(hi)}]"
        if self.n < 2:
            return f"{_num(self.estimate)} (n=1, no spread)"
        var, df = self.variance()
        half = _stats().t.ppf((1 + confidence) / 2, df) * math.sqrt(var)
        return f"{_num(self.estimate)} [{_num(self.estimate - half)}, {_num(self.estimate + half)}] (n={self.n})"

    def to_dict(self, confidence: float) -> dict[str, Any]:
        return {"term": self.label, "value": self.describe(confidence), "runs": self.runs, "n": self.n,
                "estimate": _finite(self.estimate)}


def _num(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


def _interval_text(estimate: float, span: Sequence[float] | None) -> str:
    if span is None or span[0] == span[1]:
        return _num(estimate)
    return f"{_num(estimate)} [{_num(span[0])}, {_num(span[1])}]"


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _clopper_pearson(k: int, n: int, confidence: float) -> tuple[float, float]:
    ci = _stats().binomtest(k, n).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


class _Groups:
    def __init__(self, runs: Sequence[Run], metric: str):
        self.runs, self.metric = runs, metric
        self.terms: dict[str, Term] = {}

    def term(self, call: ast.Call) -> Term:
        label = ast.unparse(call)
        if label not in self.terms:
            self.terms[label] = self._read(call, label)
        return self.terms[label]

    def _read(self, call: ast.Call, label: str) -> Term:
        name = call.func.id
        keywords = {kw.arg: kw.value.value for kw in call.keywords}
        metric = keywords.pop("metric", self.metric)
        options = {k: keywords.pop(k) for k in _FRAC_OPTIONS if name == "frac" and k in keywords}
        runs = [r for r in self.runs if all(matches_value(run_field(r, k), v) for k, v in keywords.items())]
        if name in COUNTS:
            count = len(runs) if name == "n" else sum(r.status == name for r in runs)
            return Term(label, "count", float(count), len(runs), len(runs))
        if not runs:
            return Term(label, name, math.nan, 0, 0, why=f"no run matches {label}")
        if name == "frac":
            hits = [float(self._meets(r, metric, options)) for r in runs]
            return Term(label, "frac", statistics.fmean(hits), len(runs), len(runs), hits,
                        [run_field(r, "seed") for r in runs])
        completed = [r for r in runs if r.status == "completed"]
        values = [_metric(r, metric) for r in completed]
        if len(completed) < len(runs) or any(v is None for v in values):
            missing = len(runs) - sum(v is not None for v in values)
            return Term(label, name, math.nan, len(runs), 0,
                        why=f"{missing} of {len(runs)} runs did not finish with a {metric}")
        estimate = statistics.fmean(values) if name == "mean" else \
            (statistics.stdev(values) if len(values) > 1 else math.nan)
        why = "" if name == "mean" or len(values) > 1 else "one run has no std"
        return Term(label, name, estimate, len(runs), len(values), values,
                    [run_field(r, "seed") for r in completed], why)

    @staticmethod
    def _meets(run: Run, metric: str, options: Mapping[str, Any]) -> bool:
        if "status" in options:
            return run.status == options["status"]
        value = _metric(run, metric) if run.status == "completed" else None
        if value is None:
            return bool(options.get("diverged", False))
        return value < options["below"] if "below" in options else value > options["above"]


def _metric(run: Run, metric: str) -> float | None:
    value = (run.summary or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# --- one comparison ----------------------------------------------------------------------------------


@dataclass
class _Dual:
    """A value with its gradient over the terms (forward-mode differentiation, for the delta method)."""

    value: float
    grad: dict[str, float]

    def __add__(self, o: _Dual) -> _Dual:
        return _Dual(self.value + o.value, _combine(self.grad, 1.0, o.grad, 1.0))

    def __sub__(self, o: _Dual) -> _Dual:
        return _Dual(self.value - o.value, _combine(self.grad, 1.0, o.grad, -1.0))

    def __mul__(self, o: _Dual) -> _Dual:
        return _Dual(self.value * o.value, _combine(self.grad, o.value, o.grad, self.value))

    def __truediv__(self, o: _Dual) -> _Dual:
        if o.value == 0:
            return _Dual(math.nan, {})
        return _Dual(self.value / o.value, _combine(self.grad, 1 / o.value, o.grad, -self.value / o.value ** 2))


def _combine(a: Mapping[str, float], wa: float, b: Mapping[str, float], wb: float) -> dict[str, float]:
    out = {k: wa * v for k, v in a.items()}
    for k, v in b.items():
        out[k] = out.get(k, 0.0) + wb * v
    return out


@dataclass
class Comparison:
    """One comparison ``left > right`` (or >=) judged on its gap ``left - right``."""

    text: str
    estimate: float  # the gap at the group estimates
    interval: tuple[float, float] | None  # the gap's two-sided confidence interval
    p_holds: float  # one-sided p-value against "the claim is false"
    p_fails: float  # one-sided p-value against "the claim is true"
    method: str
    df: float | None = None
    n: dict[str, int] = field(default_factory=dict)
    seeds_needed: int | None = None  # per group, to decide it at POWER (undecided comparisons)
    why: str = ""  # why it cannot be decided, where that is not the spread
    shown: str = ""  # as written: the measured side's estimate [interval] vs the other side

    def to_dict(self) -> dict[str, Any]:
        return {"comparison": self.text, "value": self.shown, "estimate": _finite(self.estimate),
                "interval": [_finite(x) for x in self.interval] if self.interval else None,
                "p_holds": self.p_holds, "p_fails": self.p_fails, "method": self.method,
                "df": _finite(self.df) if self.df is not None else None, "n": self.n,
                "seeds_needed": self.seeds_needed, "why": self.why}

    def describe(self) -> str:
        if self.interval is None:
            return f"{self.shown} (undecided: {self.why})"
        return f"{self.shown}, {self.method}, p={_p(min(self.p_holds, self.p_fails))}"


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.2g}"


def _t_ppf(q: float, df: float) -> float:
    return float(_stats().norm.ppf(q)) if math.isinf(df) else float(_stats().t.ppf(q, df))


class _Judge:
    def __init__(self, groups: _Groups, confidence: float, paired: bool):
        self.groups, self.confidence, self.paired = groups, confidence, paired
        self.alpha = (1 - confidence) / 2  # each side's error at the two-sided confidence

    def value(self, node: ast.AST) -> _Dual:
        if isinstance(node, ast.Constant):
            return _Dual(float(node.value), {})
        if isinstance(node, ast.UnaryOp):
            inner = self.value(node.operand)
            return _Dual(0.0, {}) - inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            left, right = self.value(node.left), self.value(node.right)
            return {ast.Add: left.__add__, ast.Sub: left.__sub__, ast.Mult: left.__mul__,
                    ast.Div: left.__truediv__}[type(node.op)](right)
        term = self.groups.term(node)
        return _Dual(term.estimate, {term.label: 1.0} if term.kind != "count" else {})

    def compare(self, leaf: _Leaf) -> Comparison:
        cmp = self._compare(leaf)
        cmp.shown = leaf.shown(cmp.estimate, cmp.interval)
        return cmp

    def _compare(self, leaf: _Leaf) -> Comparison:
        gap = self.value(leaf.left) - self.value(leaf.right)
        terms = [self.groups.term(n) for n in ast.walk(ast.BinOp(leaf.left, ast.Sub(), leaf.right))
                 if isinstance(n, ast.Call)]
        n = {t.label: t.n for t in terms if t.kind != "count"}
        undefined = next((t for t in terms if not t.defined), None)
        if undefined is not None or not math.isfinite(gap.value):
            why = undefined.why if undefined is not None else "division by zero"
            return Comparison(leaf.text, gap.value, None, 1.0, 1.0, "undecided", n=n, why=why)
        random = {k: v for k, v in gap.grad.items() if v != 0}
        if not random:
            return self._exact(leaf, gap.value, n)
        if len(random) == 1:
            term = self.groups.terms[next(iter(random))]
            if term.kind == "frac":
                return self._binomial(leaf, gap, term, random[term.label], n)
        return self._t(leaf, gap, {self.groups.terms[k]: v for k, v in random.items()}, n)

    def _exact(self, leaf: _Leaf, gap: float, n: dict[str, int]) -> Comparison:
        holds = gap > 0 or (gap == 0 and not leaf.strict)
        return Comparison(leaf.text, gap, (gap, gap), 0.0 if holds else 1.0, 1.0 if holds else 0.0, "exact", n=n)

    def _binomial(self, leaf: _Leaf, gap: _Dual, term: Term, slope: float, n: dict[str, int]) -> Comparison:
        # gap = slope * p + offset: the claim is p > p0 (slope > 0) or p < p0 (slope < 0)
        k, runs = int(sum(term.values)), term.n
        p0 = term.estimate - gap.value / slope
        if p0 <= 0 or p0 >= 1:  # a share can't be below 0 or above 1: the claim is settled by arithmetic
            return self._exact(leaf, gap.value, n)
        lo, hi = _clopper_pearson(k, runs, self.confidence)
        greater = _stats().binomtest(k, runs, p0, alternative="greater").pvalue
        less = _stats().binomtest(k, runs, p0, alternative="less").pvalue
        p_holds, p_fails = (greater, less) if slope > 0 else (less, greater)
        gaps = sorted((slope * (lo - term.estimate) + gap.value, slope * (hi - term.estimate) + gap.value))
        cmp = Comparison(leaf.text, gap.value, (gaps[0], gaps[1]), float(p_holds), float(p_fails),
                         "exact binomial (Clopper-Pearson)", n=n)
        if not self._decided(cmp):
            cmp.seeds_needed = _binomial_seeds(term.estimate, p0, self.alpha)
        return cmp

    def _paired_values(self, weights: Mapping[Term, float]) -> list[float] | None:
        """Per-seed linearized gaps, where every term is a mean over one run per seed on the same seeds."""
        if not self.paired or any(t.kind != "mean" for t in weights):
            return None
        seed_sets = [t.seeds for t in weights]
        if any(len(set(s)) != len(s) or set(s) != set(seed_sets[0]) for s in seed_sets):
            return None
        by_seed = [dict(zip(t.seeds, t.values, strict=True)) for t in weights]
        return [sum(w * values[s] for w, values in zip(weights.values(), by_seed, strict=True))
                for s in sorted(seed_sets[0])]

    def _t(self, leaf: _Leaf, gap: _Dual, weights: dict[Term, float], n: dict[str, int]) -> Comparison:
        lone = [t for t in weights if t.kind in ("mean", "std") and t.n < 2]
        paired = self._paired_values(weights)
        if lone:
            cmp = Comparison(leaf.text, gap.value, None, 1.0, 1.0, "undecided", n=n,
                             why=f"{lone[0].label} has one completed run: no spread to judge it by")
            cmp.seeds_needed = self._seeds(gap.value, weights, None)
            return cmp
        if paired is not None:
            count = len(paired)
            var, df, method = statistics.variance(paired) / count, count - 1, f"paired t over {count} seeds"
        else:
            parts = [(w ** 2 * var, df) for (var, df), w in ((t.variance(), w) for t, w in weights.items())]
            var = sum(v for v, _ in parts)
            denom = sum(v ** 2 / d for v, d in parts if v > 0 and math.isfinite(d))
            df = var ** 2 / denom if denom > 0 else math.inf
            linear = all(t.kind == "mean" for t in weights) and _is_linear(leaf)
            method = "Welch t" if linear else "delta method, Welch t"
        if var == 0:  # every group's runs agree exactly: the gap is known
            cmp = self._exact(leaf, gap.value, n)
            cmp.method = "exact (no spread)"
            return cmp
        se = math.sqrt(var)
        half = _t_ppf(1 - self.alpha, df) * se
        t = gap.value / se
        p_holds = float(_stats().norm.sf(t) if math.isinf(df) else _stats().t.sf(t, df))
        p_fails = float(_stats().norm.cdf(t) if math.isinf(df) else _stats().t.cdf(t, df))
        cmp = Comparison(leaf.text, gap.value, (gap.value - half, gap.value + half), p_holds, p_fails, method,
                         df=df, n=n)
        if not self._decided(cmp):
            cmp.seeds_needed = self._seeds(gap.value, weights, paired)
        return cmp

    def _decided(self, cmp: Comparison) -> bool:
        return min(cmp.p_holds, cmp.p_fails) <= self.alpha

    def _seeds(self, gap: float, weights: Mapping[Term, float], paired: list[float] | None) -> int | None:
        """Seeds per group for a t-test at level alpha to decide ``gap`` with POWER, its spread as observed."""
        if gap == 0:
            return None
        if paired is not None:
            unit = [(statistics.variance(paired), 1.0)]
        else:
            per_run = {t: t.per_run_variance() for t in weights}
            known = [v for v in per_run.values() if v is not None]
            fallback = statistics.fmean(known) if known else None  # a lone run borrows the others' spread
            unit = []
            for t, w in weights.items():
                v = fallback if per_run[t] is None else per_run[t]
                if v is None:
                    return None
                unit.append((w ** 2 * v, 0.0 if t.kind == "frac" else 1.0))
        total = sum(v for v, _ in unit)
        # the normal approximation is a lower bound (t quantiles exceed z ones): start the search there
        z = float(_stats().norm.ppf(1 - self.alpha) + _stats().norm.ppf(POWER))
        start = max(2, math.ceil(total * (z / abs(gap)) ** 2)) if total > 0 else 2
        if start > MAX_SEEDS:
            return None
        normal = all(kind == 0.0 for _, kind in unit)
        for seeds in range(start, MAX_SEEDS + 1):
            var = total / seeds
            if var == 0:
                return seeds
            spread = sum((v / seeds) ** 2 / (seeds - 1) for v, k in unit if k)
            df = math.inf if normal or spread == 0 else seeds - 1 if paired is not None else var ** 2 / spread
            if abs(gap) / math.sqrt(var) >= _t_ppf(1 - self.alpha, df) + _t_ppf(POWER, df):
                return seeds
        return None


def _is_linear(leaf: _Leaf) -> bool:
    """Whether the gap is a sum of terms times plain numbers (no product or quotient of two terms)."""
    for node in ast.walk(ast.BinOp(leaf.left, ast.Sub(), leaf.right)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            if not (_is_exact_number(node.right) or isinstance(node.op, ast.Mult) and _is_exact_number(node.left)):
                return False
    return True


def _binomial_seeds(p: float, p0: float, alpha: float) -> int | None:
    """Runs for a one-sided binomial test at alpha to tell p from p0 with POWER (normal approximation)."""
    if p == p0:
        return None
    za, zb = _stats().norm.ppf(1 - alpha), _stats().norm.ppf(POWER)
    p = min(max(p, 0.02), 0.98)
    seeds = ((za * math.sqrt(p0 * (1 - p0)) + zb * math.sqrt(p * (1 - p))) / (p - p0)) ** 2
    return min(max(2, math.ceil(seeds)), MAX_SEEDS) if seeds <= MAX_SEEDS else None


# --- checks and the verdict ---------------------------------------------------------------------------


@dataclass
class CheckResult:
    """One check's judgement and the evidence behind it."""

    check: str
    result: str  # holds | fails | inconclusive
    value: str  # each comparison's gap with its interval, as a reader sees it
    p_holds: float  # p-value against "the check is false" (holds when <= (1 - C) / 2)
    p_fails: float  # p-value against "the check is true", before Holm's correction
    p_fails_holm: float = 1.0  # after it, across the study's checks
    seeds_needed: int | None = None  # undecided checks: seeds per group that would decide it
    comparisons: list[Comparison] = field(default_factory=list)
    terms: list[dict[str, Any]] = field(default_factory=list)  # each group statistic it read

    @property
    def estimate(self) -> float | None:
        """The gap of a single comparison (None for joined ones: see ``comparisons``)."""
        return self.comparisons[0].estimate if len(self.comparisons) == 1 else None

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.comparisons[0].interval if len(self.comparisons) == 1 else None

    @property
    def n(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for cmp in self.comparisons:
            out.update(cmp.n)
        return out

    @property
    def p_value(self) -> float:
        """The p-value of the result: against the claim's opposite if it holds, Holm's if it fails, else the smaller."""
        if self.result == HOLDS:
            return self.p_holds
        if self.result == FAILS:
            return self.p_fails_holm
        return min(self.p_holds, self.p_fails_holm)

    def to_dict(self) -> dict[str, Any]:
        interval = self.interval
        return {"check": self.check, "result": self.result, "value": self.value,
                "estimate": _finite(self.estimate) if self.estimate is not None else None,
                "interval": [_finite(x) for x in interval] if interval else None,
                "p_value": self.p_value, "p_holds": self.p_holds, "p_fails": self.p_fails,
                "p_fails_holm": self.p_fails_holm, "n": self.n,
                "seeds_needed": self.seeds_needed if self.result == UNKNOWN else None,
                "comparisons": [c.to_dict() for c in self.comparisons], "terms": self.terms}


@dataclass
class Verdict:
    study: str
    claim: str
    verdict: str
    evidence: list[CheckResult]
    metric: str = DEFAULT_METRIC
    confidence: float = DEFAULT_CONFIDENCE
    paired: bool = False

    @property
    def seeds_needed(self) -> int | None:
        """Seeds per group that would decide every undecided check (None: decided, or no estimate)."""
        needed = [e.seeds_needed for e in self.evidence if e.result == UNKNOWN]
        return max(needed) if needed and all(s is not None for s in needed) else None

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "claim": self.claim, "verdict": self.verdict, "metric": self.metric,
                "confidence": self.confidence, "paired": self.paired, "correction": "holm",
                "seeds_needed": self.seeds_needed, "evidence": [e.to_dict() for e in self.evidence]}

    def method_sentence(self) -> str:
        pct = f"{100 * self.confidence:g}%"
        return (f"Each check on `{self.metric}` at {pct} confidence: a comparison holds when its whole {pct} "
                f"interval lies on the claimed side ({'paired t over shared seeds, else ' if self.paired else ''}"
                "Welch t over seeds; exact binomial for shares), fails when it lies on the other side after "
                "Holm's correction across checks.")

    def format_lines(self) -> list[str]:
        lines = [f"verdict: {self.verdict} at {100 * self.confidence:g}% confidence - {self.claim}"]
        for e in self.evidence:
            more = f"; about {e.seeds_needed} seeds per group would decide it" if e.result == UNKNOWN and \
                e.seeds_needed else ""
            lines.append(f"  [{e.result}] {e.check}   (p={_p(e.p_value)}{more})")
            for c in e.comparisons:
                lines.append(f"      {c.describe()}")
            for t in e.terms:
                lines.append(f"      {t['term']} = {t['value']}")
        return lines

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The evidence as one row per check: result, gap(s) with intervals, p-value, n, seeds needed."""
        headers = ["check", "result", f"estimate [{100 * self.confidence:g}% interval] vs threshold", "p",
                   "n per group", "seeds needed"]
        rows = []
        for e in self.evidence:
            ns = sorted(set(e.n.values()))
            rows.append([e.check, e.result, e.value, _p(e.p_value), "/".join(map(str, ns)) or "-",
                         str(e.seeds_needed) if e.result == UNKNOWN and e.seeds_needed else ""])
        return headers, rows


def _judge(node: _Leaf | _Node, judge: _Judge, out: list[Comparison]) -> tuple[float, float, int | None]:
    """(p_holds, p_fails, seeds_needed) of a formula, its comparisons appended to ``out``."""
    if isinstance(node, _Leaf):
        cmp = judge.compare(node)
        out.append(cmp)
        decided = judge._decided(cmp)
        return cmp.p_holds, cmp.p_fails, max(cmp.n.values(), default=0) if decided else cmp.seeds_needed
    parts = [_judge(child, judge, out) for child in node.children]
    k = len(parts)
    holds, fails, seeds = [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
    if node.op == "not":
        return fails[0], holds[0], seeds[0]
    if node.op == "and":  # intersection-union for holding; Bonferroni for the union of failures
        need = None if any(s is None for s in seeds) else max(seeds)
        return max(holds), min(1.0, k * min(fails)), need
    need = min((s for s in seeds if s is not None), default=None)
    return min(1.0, k * min(holds)), max(fails), need


def evaluate_check(text: str, runs: Sequence[Run], metric: str = DEFAULT_METRIC,
                   confidence: float = DEFAULT_CONFIDENCE, paired: bool = False) -> CheckResult:
    """One check judged from ``runs`` (before any correction across checks)."""
    confidence = check_confidence(confidence)
    groups = _Groups(runs, metric)
    judge = _Judge(groups, confidence, paired)
    comparisons: list[Comparison] = []
    p_holds, p_fails, seeds = _judge(_compiled(text), judge, comparisons)
    result = HOLDS if p_holds <= judge.alpha else FAILS if p_fails <= judge.alpha else UNKNOWN
    value = "; ".join(_gap_text(c) for c in comparisons)
    return CheckResult(check=text.strip(), result=result, value=value, p_holds=p_holds, p_fails=p_fails,
                       p_fails_holm=p_fails, seeds_needed=seeds, comparisons=comparisons,
                       terms=[t.to_dict(confidence) for t in groups.terms.values()])


def _gap_text(cmp: Comparison) -> str:
    return cmp.shown if cmp.interval is not None else f"{cmp.shown} (undecided: {cmp.why})"


def _holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (each at most 1, monotone in the order of the raw ones)."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def evaluate(study: str, claim: str, checks: Sequence[str], runs: Sequence[Run],
             metric: str = DEFAULT_METRIC, confidence: float = DEFAULT_CONFIDENCE, paired: bool = False) -> Verdict:
    """The study's verdict from its runs at ``confidence``; see the module docstring for the rules."""
    if not checks:
        raise SpecError(f"study {study!r} has no verdict checks")
    confidence = check_confidence(confidence)
    evidence = [evaluate_check(c, runs, metric, confidence, paired) for c in checks]
    alpha = (1 - confidence) / 2
    for e, adjusted in zip(evidence, _holm([e.p_fails for e in evidence]), strict=True):
        e.p_fails_holm = adjusted
        e.result = HOLDS if e.p_holds <= alpha else FAILS if adjusted <= alpha else UNKNOWN
    results = {e.result for e in evidence}
    verdict = NOT_SUPPORTED if FAILS in results else INCONCLUSIVE if UNKNOWN in results else SUPPORTED
    return Verdict(study=study, claim=claim, verdict=verdict, evidence=evidence, metric=metric,
                   confidence=confidence, paired=paired)


__all__ = ["CheckResult", "Comparison", "DEFAULT_CONFIDENCE", "INCONCLUSIVE", "NOT_SUPPORTED",
           "SUPPORTED", "Term", "Verdict", "check_confidence", "evaluate", "evaluate_check", "parse_check"]
