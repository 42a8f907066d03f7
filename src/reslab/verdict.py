"""A study's claim as a predicate over its own results, and the verdict it gives.

A claim is written as one or more *checks*, each an expression over the
statistics of the study's groups, e.g. (Wu & He 2018, Fig. 1)::

    mean(norm="bn", batch_size=32) - mean(norm="bn", batch_size=2) >= 0.10
    abs(mean(norm="gn", batch_size=32) - mean(norm="gn", batch_size=2)) < 0.03

The expression language (parsed with :mod:`ast`, never ``eval``):

| term | value |
|---|---|
| ``mean(field=value, ...)`` | mean of the study's metric over the completed runs of the group |
| ``std(field=value, ...)`` | their sample std (ddof=1) |
| ``diverged(...)``, ``failed(...)``, ``completed(...)``, ``n(...)`` | run counts in the group |
| ``mean(..., metric="final_train_loss")`` | another metric of ``summary.json`` |
| numbers, ``+ - * /``, ``abs()``, ``min()``, ``max()`` | arithmetic |
| ``<  <=  >  >=`` | a comparison (one per check, or chained with ``and`` / ``or`` / ``not``) |

A group is selected by the grid fields it names; fields left out pool over
their values (``mean(norm="bn")`` is every BN run).  Percent claims use
fractions: accuracies are stored as fractions.

Each ``mean`` is an interval, mean ± std over the seeds, and arithmetic
carries intervals along (interval arithmetic).  A comparison *holds* when it
holds for the whole interval, *fails* when it fails for the whole interval,
and is *inconclusive* when the seeds' spread straddles the threshold.  A mean
over a group with diverged or failed runs, or with no completed run, is
undefined: its comparison is inconclusive, since the runs that did not finish
would decide it.  ``and`` / ``or`` / ``not`` follow three-valued (Kleene)
logic, so ``diverged(norm="none") >= 1 or mean(norm="bn") - mean(norm="none") >= 0.1``
holds when the runs without a norm diverged.

The verdict: ``supported`` when every check holds, ``not supported`` when any
check fails, ``inconclusive`` otherwise - with the numbers behind each check as
evidence.
"""

from __future__ import annotations

import ast
import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import SpecError

SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE = "supported", "not supported", "inconclusive"
HOLDS, FAILS, UNKNOWN = "holds", "fails", "inconclusive"
COUNTS = ("diverged", "failed", "completed", "n")
DEFAULT_METRIC = "final_eval_acc"


@dataclass(frozen=True)
class RunResult:
    """What a check reads of one run: its grid values, status and summary."""

    values: Mapping[str, Any]   # config field -> value (the grid fields at least)
    status: str                 # completed | diverged | failed
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class Interval:
    lo: float
    hi: float
    defined: bool = True  # False: a mean of a group whose runs did not all finish
    why: str = ""

    @property
    def mid(self) -> float:
        return (self.lo + self.hi) / 2

    @staticmethod
    def exact(value: float) -> Interval:
        return Interval(value, value)

    @staticmethod
    def undefined(why: str) -> Interval:
        return Interval(math.nan, math.nan, False, why)

    def _join(self, other: Interval, lo: float, hi: float) -> Interval:
        if not (self.defined and other.defined):
            return Interval.undefined(self.why or other.why)
        return Interval(lo, hi)

    def __add__(self, other: Interval) -> Interval:
        return self._join(other, self.lo + other.lo, self.hi + other.hi)

    def __sub__(self, other: Interval) -> Interval:
        return self._join(other, self.lo - other.hi, self.hi - other.lo)

    def __mul__(self, other: Interval) -> Interval:
        products = [self.lo * other.lo, self.lo * other.hi, self.hi * other.lo, self.hi * other.hi]
        return self._join(other, min(products), max(products))

    def __truediv__(self, other: Interval) -> Interval:
        if other.defined and other.lo <= 0 <= other.hi:
            return Interval.undefined("division by an interval that holds 0")
        return self * Interval(1 / other.hi, 1 / other.lo, other.defined, other.why) if other.defined \
            else Interval.undefined(other.why)

    def __neg__(self) -> Interval:
        return Interval(-self.hi, -self.lo, self.defined, self.why)

    def __abs__(self) -> Interval:
        if not self.defined:
            return self
        if self.lo >= 0:
            return self
        if self.hi <= 0:
            return -self
        return Interval(0.0, max(-self.lo, self.hi))

    def describe(self) -> str:
        if not self.defined:
            return f"undefined ({self.why})"
        if self.lo == self.hi:
            return _num(self.lo)
        return f"{_num(self.mid)} ± {_num((self.hi - self.lo) / 2)}"


def _num(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e9:
        return str(int(value))
    return f"{value:.4g}"


@dataclass
class CheckResult:
    check: str
    result: str                                   # holds | fails | inconclusive
    value: str                                    # "left vs right": both sides as intervals
    terms: list[dict[str, Any]] = field(default_factory=list)  # each group statistic it read

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "result": self.result, "value": self.value, "terms": self.terms}


@dataclass
class Verdict:
    study: str
    claim: str
    verdict: str
    evidence: list[CheckResult]
    metric: str = DEFAULT_METRIC

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.study, "claim": self.claim, "verdict": self.verdict, "metric": self.metric,
                "evidence": [e.to_dict() for e in self.evidence]}

    def format_lines(self) -> list[str]:
        lines = [f"verdict: {self.verdict} - {self.claim}"]
        for e in self.evidence:
            lines.append(f"  [{e.result}] {e.check}   ({e.value})")
            for t in e.terms:
                lines.append(f"      {t['term']} = {t['value']}")
        return lines


# --- parsing ---------------------------------------------------------------------------

_FUNCTIONS = ("mean", "std", *COUNTS, "abs", "min", "max")
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


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
                    raise SpecError(f"verdict check {text!r}: only < <= > >= compare; "
                                    f"got {type(op).__name__}")
        elif isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else None
            if name not in _FUNCTIONS:
                raise SpecError(f"verdict check {text!r}: unknown function {ast.unparse(node.func)!r}; "
                                f"valid: {', '.join(_FUNCTIONS)}")
            if name in ("mean", "std", *COUNTS):
                if node.args:
                    raise SpecError(f"verdict check {text!r}: {name}() selects a group by keywords, "
                                    f"e.g. {name}(norm=\"bn\")")
                for kw in node.keywords:
                    if kw.arg is None or not isinstance(kw.value, ast.Constant):
                        hint = (f" (quote text values: {kw.arg}=\"{kw.value.id}\")"
                                if isinstance(kw.value, ast.Name) else "")
                        raise SpecError(f"verdict check {text!r}: {name}() takes field=constant keywords{hint}")
                    if kw.arg == "metric":
                        if name not in ("mean", "std") or not isinstance(kw.value.value, str):
                            raise SpecError(f"verdict check {text!r}: metric= is a summary field name, "
                                            "for mean() and std()")
                    elif known is not None and kw.arg not in known:
                        raise SpecError(f"verdict check {text!r}: {kw.arg!r} is not a field the study sets "
                                        f"(its grid or base); valid: {', '.join(sorted(known)) or 'none'}")
            elif node.keywords or not node.args:
                raise SpecError(f"verdict check {text!r}: {name}() takes positional numbers")
        elif isinstance(node, ast.Name) and node.id not in _FUNCTIONS:
            raise SpecError(f"verdict check {text!r}: unknown name {node.id!r} (quote text values: "
                            f"norm=\"bn\")")
        elif not isinstance(node, (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub,
                                   ast.UAdd, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Constant,
                                   ast.Name, ast.Load, ast.Call, ast.keyword, ast.Compare, *_COMPARE)):
            raise SpecError(f"verdict check {text!r}: {type(node).__name__} is not allowed")
    if not has_comparison:
        raise SpecError(f"verdict check {text!r} compares nothing; write e.g. mean(norm=\"bn\") >= 0.9")
    return tree


# --- evaluating ----------------------------------------------------------------------------------


def _matches(value: Any, wanted: Any) -> bool:
    if value == wanted:
        return True
    try:  # 32 vs "32", 0.1 vs "0.1": grid values may come from text
        return str(value) == str(wanted) or float(value) == float(wanted)
    except (TypeError, ValueError):
        return False


class _Evaluator:
    def __init__(self, runs: Sequence[RunResult], metric: str):
        self.runs, self.metric = runs, metric
        self.terms: list[dict[str, Any]] = []

    def group(self, selector: Mapping[str, Any]) -> list[RunResult]:
        return [r for r in self.runs if all(_matches(r.values.get(k), v) for k, v in selector.items())]

    def term(self, name: str, keywords: list[ast.keyword]) -> Interval:
        selector = {kw.arg: kw.value.value for kw in keywords if kw.arg != "metric"}
        metric = next((kw.value.value for kw in keywords if kw.arg == "metric"), self.metric)
        runs = self.group(selector)
        label = f"{name}({', '.join(f'{k}={v!r}' for k, v in selector.items())}" + \
            (f", metric={metric!r})" if metric != self.metric else ")")
        if name in COUNTS:
            count = len(runs) if name == "n" else sum(r.status == name for r in runs)
            value = Interval.exact(float(count))
        else:
            completed = [r for r in runs if r.status == "completed"]
            values = [float(r.summary[metric]) for r in completed
                      if isinstance(r.summary.get(metric), (int, float)) and math.isfinite(r.summary[metric])]
            unfinished = len(runs) - len(completed)
            if not runs:
                value = Interval.undefined(f"no run matches {label}")
            elif unfinished or len(values) < len(completed):
                value = Interval.undefined(f"{unfinished or len(completed) - len(values)} of {len(runs)} runs "
                                           "did not finish")
            elif name == "mean":
                mean = statistics.fmean(values)
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                value = Interval(mean - spread, mean + spread)
            else:
                value = Interval.exact(statistics.stdev(values) if len(values) > 1 else 0.0)
        self.terms.append({"term": label, "value": value.describe(), "runs": len(runs)})
        return value

    def number(self, node: ast.AST) -> Interval:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return Interval.exact(float(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            inner = self.number(node.operand)
            return -inner if isinstance(node.op, ast.USub) else inner
        if isinstance(node, ast.BinOp):
            left, right = self.number(node.left), self.number(node.right)
            ops: dict[type, Callable[[Interval, Interval], Interval]] = {
                ast.Add: Interval.__add__, ast.Sub: Interval.__sub__, ast.Mult: Interval.__mul__,
                ast.Div: Interval.__truediv__}
            return ops[type(node.op)](left, right)
        if isinstance(node, ast.Call):
            name = node.func.id
            if name in ("mean", "std", *COUNTS):
                return self.term(name, node.keywords)
            args = [self.number(a) for a in node.args]
            if name == "abs":
                return abs(args[0])
            if not all(a.defined for a in args):
                return Interval.undefined(next(a.why for a in args if not a.defined))
            pick = min if name == "min" else max
            return Interval(pick(a.lo for a in args), pick(a.hi for a in args))
        raise SpecError(f"{ast.unparse(node)!r} is not a number")

    def truth(self, node: ast.AST) -> tuple[str, tuple[Interval, Interval] | None]:
        if isinstance(node, ast.BoolOp):
            results = [self.truth(v)[0] for v in node.values]
            if isinstance(node.op, ast.And):
                out = FAILS if FAILS in results else UNKNOWN if UNKNOWN in results else HOLDS
            else:
                out = HOLDS if HOLDS in results else UNKNOWN if UNKNOWN in results else FAILS
            return out, None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = self.truth(node.operand)[0]
            return {HOLDS: FAILS, FAILS: HOLDS, UNKNOWN: UNKNOWN}[inner], None
        if isinstance(node, ast.Compare):
            results, sides = [], []
            left = self.number(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = self.number(comparator)
                sides.append((left, right))
                results.append(_compare(left - right, _COMPARE[type(op)]))  # the sign of left - right
                left = right
            out = FAILS if FAILS in results else UNKNOWN if UNKNOWN in results else HOLDS
            return out, sides[0] if len(sides) == 1 else None
        raise SpecError(f"{ast.unparse(node)!r} is not a comparison")


def _compare(gap: Interval, op: str) -> str:
    if not gap.defined:
        return UNKNOWN
    if op in (">", ">="):
        strict = op == ">"
        if gap.lo > 0 or (not strict and gap.lo >= 0):
            return HOLDS
        if gap.hi < 0 or (strict and gap.hi <= 0):
            return FAILS
        return UNKNOWN
    strict = op == "<"
    if gap.hi < 0 or (not strict and gap.hi <= 0):
        return HOLDS
    if gap.lo > 0 or (strict and gap.lo >= 0):
        return FAILS
    return UNKNOWN


def evaluate_check(text: str, runs: Sequence[RunResult], metric: str = DEFAULT_METRIC) -> CheckResult:
    tree = parse_check(text)
    ev = _Evaluator(runs, metric)
    result, sides = ev.truth(tree.body)
    value = f"{sides[0].describe()} vs {sides[1].describe()}" if sides is not None else "-"
    return CheckResult(check=text.strip(), result=result, value=value, terms=ev.terms)


def evaluate(study: str, claim: str, checks: Sequence[str], runs: Sequence[RunResult],
             metric: str = DEFAULT_METRIC) -> Verdict:
    """The study's verdict from its runs; see the module docstring for the rules."""
    if not checks:
        raise SpecError(f"study {study!r} has no verdict checks")
    evidence = [evaluate_check(c, runs, metric) for c in checks]
    results = {e.result for e in evidence}
    verdict = NOT_SUPPORTED if FAILS in results else INCONCLUSIVE if UNKNOWN in results else SUPPORTED
    return Verdict(study=study, claim=claim, verdict=verdict, evidence=evidence, metric=metric)


__all__ = ["CheckResult", "INCONCLUSIVE", "Interval", "NOT_SUPPORTED", "RunResult", "SUPPORTED", "Verdict",
           "evaluate", "evaluate_check", "parse_check"]
