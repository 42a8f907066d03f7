"""Studies: a sweep, a report and a claim checked against the sweep's own runs.

A study is data, one YAML file: ``reslab study NAME`` runs a shipped one
(``reslab list studies``), ``reslab study path/to/my_study.yaml`` a user's own::

    name: batch-size
    claim: BatchNorm loses at least 10 points from batch 32 to 2 while GroupNorm moves by less than 3
    source: Wu & He 2018, Figure 1          # optional
    budget_s: 300                           # optional: what it takes on 2 CPU cores
    jobs: 2                                 # optional: runs at once by default (--jobs overrides)
    notes: ...                              # optional
    base: {model: simple_cnn, dataset: mnist5k, epochs: 2, ...}   # any train option
    grid: {norm: [bn, gn], batch_size: [32, 16, 8, 4, 2]}       # the axes of the sweep
    seeds: [0, 1]
    confidence: 0.95                        # optional: the confidence every check is judged at
    verdict:
      metric: final_eval_acc                # any number in summary.json
      paired: false                         # optional: compare groups that share seeds seed by seed
      checks:                               # see reslab.verdict for the expression language
        - mean(norm="bn", batch_size=32) - mean(norm="bn", batch_size=2) >= 0.10
        - abs(mean(norm="gn", batch_size=32) - mean(norm="gn", batch_size=2)) < 0.03
    reference:                              # optional: the source's own numbers, shown beside the runs'
      source: Wu & He 2018, Figure 1
      dataset: ImageNet
      groups:
        - {norm: bn, batch_size: 32, value: 0.764}
    measure: [bn_running_var]               # optional: measurements of the finished runs (reslab.measure)

``grid`` may also be a list of such mappings: the sweep runs the union of their
points (each point once), for studies whose groups are not a full cross product.

After the sweep the verdict is computed from the runs and written, with the
study itself (``study.yaml``), into the study directory as ``verdict.json``;
``reslab report`` on that directory computes it again from whatever runs are
there.  No study needs Python code.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import SpecError, choices_error
from .verdict import (
    DEFAULT_CONFIDENCE,
    DEFAULT_METRIC,
    Verdict,
    check_confidence,
    evaluate,
    matches_value,
    parse_check,
)

if TYPE_CHECKING:
    from .rundir import Run

log = logging.getLogger(__name__)

STUDY_DIR = Path(__file__).parent / "configs" / "studies"
STUDY_FILE, VERDICT_FILE, MEASUREMENTS_FILE = "study.yaml", "verdict.json", "measurements.json"
_KEYS = ("name", "claim", "source", "budget_s", "jobs", "notes", "base", "grid", "seeds", "confidence", "verdict",
         "reference", "measure")
_VERDICT_KEYS = ("metric", "checks", "paired")
_REFERENCE_KEYS = ("source", "dataset", "metric", "groups")


@dataclass(frozen=True)
class Study:
    name: str
    claim: str  # the claim the study reproduces, in words; ``checks`` say it as predicates
    base: dict[str, Any]
    grid: dict[str, list[Any]] | list[dict[str, list[Any]]]  # one cross product, or a union of them
    checks: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    metric: str = DEFAULT_METRIC
    confidence: float = DEFAULT_CONFIDENCE  # each check is judged at this confidence
    paired: bool = False  # groups that share their seeds are compared seed by seed
    # the source's numbers: source, dataset, metric, groups [{where, value: a number or [low, high]}]
    reference: dict[str, Any] | None = None
    measure: tuple[str, ...] = ()  # reslab.measure measurements of the finished runs
    source: str = ""
    notes: str = ""
    budget_s: float | None = None  # wall time on 2 CPU cores with the offline defaults
    jobs: int = 1  # runs at once unless --jobs says otherwise (each with cpu_count / jobs threads)
    path: Path | None = field(default=None, compare=False)

    @property
    def grids(self) -> list[dict[str, list[Any]]]:
        """The grid as a list of cross products (one for a plain mapping)."""
        return [self.grid] if isinstance(self.grid, Mapping) else list(self.grid)

    @property
    def fields(self) -> list[str]:
        """Every field the study sets: its grid axes, then its base."""
        axes = [name for grid in self.grids for name in grid]
        return list(dict.fromkeys([*axes, *self.base]))

    @property
    def cost(self) -> str:
        if self.budget_s is None:
            return ""
        return f"<= {self.budget_s:g} s" if self.budget_s < 120 else f"<= {self.budget_s / 60:g} min"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "claim": self.claim}
        if self.source:
            data["source"] = self.source
        if self.budget_s is not None:
            data["budget_s"] = self.budget_s
        if self.jobs != 1:
            data["jobs"] = self.jobs
        if self.notes:
            data["notes"] = self.notes
        grids = [{k: list(v) for k, v in grid.items()} for grid in self.grids]
        data.update({"base": dict(self.base), "grid": grids[0] if isinstance(self.grid, Mapping) else grids,
                     "seeds": list(self.seeds)})
        if self.confidence != DEFAULT_CONFIDENCE:
            data["confidence"] = self.confidence
        data["verdict"] = {"metric": self.metric, "checks": list(self.checks),
                           **({"paired": True} if self.paired else {})}
        if self.reference is not None:
            ref = self.reference
            data["reference"] = {**{k: ref[k] for k in ("source", "dataset", "metric") if ref.get(k)},
                                 "groups": [{**g["where"], "value": g["value"]} for g in ref["groups"]]}
        if self.measure:
            data["measure"] = list(self.measure)
        return data

    def verdict(self, runs: Sequence[Run], confidence: float | None = None) -> Verdict:
        """The claim judged from ``runs`` (its finished run records), at the study's confidence unless another
        is given."""
        return evaluate(self.name, self.claim, self.checks, runs, self.metric,
                        confidence=self.confidence if confidence is None else confidence, paired=self.paired)


def study_from_dict(data: Mapping[str, Any], where: str) -> Study:
    """Validate a study mapping (from YAML); every problem is a SpecError naming ``where``."""
    if not isinstance(data, Mapping):
        raise SpecError(f"study {where}: expected a mapping with keys {', '.join(_KEYS)}")
    unknown = [k for k in data if k not in _KEYS]
    if unknown:
        raise SpecError(f"study {where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_KEYS)}")
    for key in ("name", "claim", "verdict"):
        if not data.get(key):
            raise SpecError(f"study {where}: missing {key!r}")
    if "grid" not in data:  # (an empty grid is one config over the seeds: `--FIELD VALUE` narrowing its only axis)
        raise SpecError(f"study {where}: missing 'grid'")
    name, claim = str(data["name"]), " ".join(str(data["claim"]).split())
    base = data.get("base") or {}
    if not isinstance(base, Mapping):
        raise SpecError(f"study {where}: 'base' must be a mapping of train option: value")
    grid = _grid(data["grid"], where)
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in seeds):
        raise SpecError(f"study {where}: 'seeds' must be a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise SpecError(f"study {where}: 'seeds' repeats a seed: {seeds}")
    verdict = data["verdict"]
    if not isinstance(verdict, Mapping) or not isinstance(verdict.get("checks"), list) or not verdict["checks"]:
        raise SpecError(f"study {where}: 'verdict' needs a non-empty list 'checks' (and optionally 'metric', "
                        "'paired')")
    extra = [k for k in verdict if k not in _VERDICT_KEYS]
    if extra:
        raise SpecError(f"study {where}: unknown verdict key {extra[0]!r}; valid keys: {', '.join(_VERDICT_KEYS)}")
    paired = verdict.get("paired", False)
    if not isinstance(paired, bool):
        raise SpecError(f"study {where}: 'verdict.paired' must be true or false, got {paired!r}")
    confidence = check_confidence(data.get("confidence", DEFAULT_CONFIDENCE), f"study {where}: 'confidence'")
    checks = tuple(str(c) for c in verdict["checks"])
    grids = [grid] if isinstance(grid, Mapping) else grid
    fields = [*(k for g in grids for k in g), *base]
    for check in checks:
        # a check selects runs by any field the study sets: an axis of its grid, or one its base
        # fixes (an axis that `reslab study NAME --field VALUE` narrowed to one value moves there)
        parse_check(check, grid_fields=fields)
    budget = data.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise SpecError(f"study {where}: 'budget_s' must be a positive number of seconds")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"study {where}: 'jobs' must be a positive integer (runs at once), got {jobs!r}")
    return Study(name=name, claim=claim, base=dict(base), grid=grid, checks=checks,
                 seeds=tuple(seeds), metric=str(verdict.get("metric", DEFAULT_METRIC)), confidence=confidence,
                 paired=paired, reference=_reference(data.get("reference"), grids, base, where),
                 measure=_measure(data.get("measure"), where),
                 source=str(data.get("source") or ""), notes=" ".join(str(data.get("notes") or "").split()),
                 budget_s=float(budget) if budget is not None else None, jobs=jobs)


def _grid(grid: Any, where: str) -> dict[str, list[Any]] | list[dict[str, list[Any]]]:
    """A grid mapping, or a non-empty list of them (a union), each axis a non-empty list."""
    grids = grid if isinstance(grid, list) else [grid or {}]
    if not grids:
        raise SpecError(f"study {where}: 'grid' as a list needs at least one mapping")
    checked = []
    for one in grids:
        if not isinstance(one, Mapping):
            raise SpecError(f"study {where}: 'grid' must be a mapping of train option: [values], or a list of such "
                            "mappings")
        for axis, values in one.items():
            if not isinstance(values, list) or not values:
                raise SpecError(f"study {where}: grid axis {axis!r} must be a non-empty list of values")
        checked.append({k: list(v) for k, v in one.items()})
    return checked if isinstance(grid, list) else checked[0]


def _reference(data: Any, grids: list[dict[str, list[Any]]], base: Mapping[str, Any],
               where: str) -> dict[str, Any] | None:
    """The source's numbers per group, as published numbers come: "85.2", or "85.2-85.8" over repeats.

    Each group must be one the study runs, each value a number or a range ``[low, high]`` (kept in that
    order): the numbers shown beside the measured ones must be the source's, never a guess at them.
    """
    if data is None:
        return None
    if not isinstance(data, Mapping) or not isinstance(data.get("groups"), list) or not data["groups"]:
        raise SpecError(f"study {where}: 'reference' needs 'groups', a list of {{field: value, ..., value: number}} "
                        f"(and 'source', 'dataset')")
    extra = [k for k in data if k not in _REFERENCE_KEYS]
    if extra:
        raise SpecError(f"study {where}: unknown reference key {extra[0]!r}; valid keys: {', '.join(_REFERENCE_KEYS)}")
    groups = []
    for entry in data["groups"]:
        if not isinstance(entry, Mapping) or "value" not in entry or len(entry) < 2:
            raise SpecError(f"study {where}: each reference group is {{field: value, ..., value: number}}, got "
                            f"{entry!r}")
        value = entry["value"]
        numbers = value if isinstance(value, list) else [value]
        if not (1 <= len(numbers) <= 2) or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                or not math.isfinite(v) for v in numbers):
            raise SpecError(f"study {where}: reference value {value!r} must be a number or [low, high]")
        selector = {k: v for k, v in entry.items() if k != "value"}
        if not any(_selects(grid, base, selector) for grid in grids):
            raise SpecError(f"study {where}: reference group {selector} is not a group the study runs; its groups "
                            f"vary {', '.join(sorted({k for g in grids for k in g})) or 'nothing'}")
        groups.append({"where": selector, "value": sorted(numbers) if len(numbers) == 2 else numbers[0]})
    metric = str(data.get("metric") or DEFAULT_METRIC)
    if is_fraction_metric(metric) and any(v > 1 for g in groups for v in _bounds(g["value"])):
        log.warning("study %s: a reference accuracy above 1 - reference accuracies are fractions (0.852, not "
                    "85.2)", where)
    return {"source": str(data.get("source") or ""), "dataset": str(data.get("dataset") or ""),
            "metric": metric, "groups": groups}


def is_fraction_metric(metric: str) -> bool:
    """Whether ``metric`` is an accuracy: a fraction in summaries and references, shown in %."""
    return "acc" in metric.lower()


def _bounds(value: float | list[float]) -> list[float]:
    return list(value) if isinstance(value, list) else [value]


def _selects(grid: Mapping[str, list[Any]], base: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    """Whether some point of ``grid`` (over ``base``) has every value ``selector`` names."""
    for name, wanted in selector.items():
        values = grid[name] if name in grid else [base[name]] if name in base else None
        if values is None or not any(matches_value(v, wanted) for v in values):
            return False
    return True


def _measure(data: Any, where: str) -> tuple[str, ...]:
    if data is None:
        return ()
    from .measure import MEASUREMENTS

    names = data if isinstance(data, list) else [data]
    for name in names:
        if name not in MEASUREMENTS:
            raise SpecError(f"study {where}: unknown measurement {name!r}; valid: {', '.join(MEASUREMENTS)}")
    return tuple(str(n) for n in names)


def load_study_file(path: str | Path) -> Study:
    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text())
    except OSError as exc:
        raise SpecError(f"study file {str(path)!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise SpecError(f"study file {str(path)!r} is not valid YAML: {first}") from None
    study = study_from_dict(data, repr(str(path)))
    return Study(**{**study.__dict__, "path": file})


def shipped_studies() -> dict[str, Study]:
    """The studies shipped with reslab, by name."""
    studies = {}
    for file in sorted(STUDY_DIR.glob("*.yaml")):
        study = load_study_file(file)
        studies[study.name] = study
    return studies


def get_study(name_or_path: str) -> Study:
    """A shipped study by name, or a study YAML file by path."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or Path(text).is_file():
        if not Path(text).is_file():
            raise SpecError(f"study file {text!r} does not exist; shipped studies: {', '.join(shipped_studies())}")
        return load_study_file(text)
    studies = shipped_studies()
    if text not in studies:
        raise choices_error("study", text, studies)
    return studies[text]


def list_studies() -> dict[str, str]:
    return {name: f"{study.claim}" + (f" [{study.cost} on 2 CPU cores]" if study.cost else "")
            for name, study in shipped_studies().items()}


def read_study(directory: str | Path) -> Study | None:
    """The study a study directory was run for (its ``study.yaml``), or None."""
    file = Path(directory) / STUDY_FILE
    return load_study_file(file) if file.is_file() else None


def plan_study(study: Study, base: Mapping[str, Any] | None = None, grid: Mapping[str, Sequence[Any]] | None = None,
               seeds: Sequence[int] | None = None) -> Study:
    """``study`` with overrides, as ``reslab study NAME --field value[,value...]`` runs it.

    A ``base`` value fixes a field (an axis of the study's grid included: it leaves the
    grid), a ``grid`` list makes it an axis (replacing the study's own); ``seeds``
    replaces the study's seeds.  Returns the planned study, checked: its verdict checks
    may select on any field it sets.  SpecError if the overrides leave it invalid.
    """
    base, grid = dict(base or {}), {k: list(v) for k, v in (grid or {}).items()}
    plan_grids = []
    for own in study.grids:
        one = {k: v for k, v in own.items() if k not in base and k not in grid}
        one.update(grid)
        if one not in plan_grids:  # narrowing can make two parts of a union the same
            plan_grids.append(one)
    fixed = {k for g in plan_grids for k in g}
    plan_base = {k: v for k, v in study.base.items() if k not in fixed}
    plan_base.update(base)
    plan_grid = plan_grids[0] if isinstance(study.grid, Mapping) or len(plan_grids) == 1 else plan_grids
    planned = replace(study, base=plan_base, grid=plan_grid, seeds=tuple(study.seeds if seeds is None else seeds),
                      reference=_narrowed_reference(study.reference, plan_grids, plan_base))
    study_from_dict(planned.to_dict(), repr(study.name))
    return planned


def _narrowed_reference(reference: dict[str, Any] | None, grids: list[dict[str, list[Any]]],
                        base: Mapping[str, Any]) -> dict[str, Any] | None:
    """The reference groups an overridden study still runs (None if none is left)."""
    if reference is None:
        return None
    groups = [g for g in reference["groups"] if any(_selects(grid, base, g["where"]) for grid in grids)]
    return {**reference, "groups": groups} if groups else None


def write_study(study: Study, directory: str | Path) -> Path:
    from .fileio import atomic_write_text

    return atomic_write_text(Path(directory) / STUDY_FILE, yaml.safe_dump(study.to_dict(), sort_keys=False))


__all__ = ["MEASUREMENTS_FILE", "STUDY_FILE", "VERDICT_FILE", "Study", "get_study", "is_fraction_metric",
           "list_studies", "load_study_file", "plan_study", "read_study", "shipped_studies", "study_from_dict",
           "write_study"]
