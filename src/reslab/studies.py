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
    verdict:
      metric: final_eval_acc                # any number in summary.json
      checks:                               # see reslab.verdict for the expression language
        - mean(norm="bn", batch_size=32) - mean(norm="bn", batch_size=2) >= 0.10
        - abs(mean(norm="gn", batch_size=32) - mean(norm="gn", batch_size=2)) < 0.03

After the sweep the verdict is computed from the runs and written, with the
study itself (``study.yaml``), into the study directory as ``verdict.json``;
``reslab report`` on that directory computes it again from whatever runs are
there.  No study needs Python code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError, choices_error
from .verdict import DEFAULT_METRIC, RunResult, Verdict, evaluate, parse_check

STUDY_DIR = Path(__file__).parent / "configs" / "studies"
STUDY_FILE, VERDICT_FILE = "study.yaml", "verdict.json"
_KEYS = ("name", "claim", "source", "budget_s", "jobs", "notes", "base", "grid", "seeds", "verdict")


@dataclass(frozen=True)
class Study:
    name: str
    claim: str  # the claim the study reproduces, in words; ``checks`` say it as predicates
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    checks: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    metric: str = DEFAULT_METRIC
    source: str = ""
    notes: str = ""
    budget_s: float | None = None  # wall time on 2 CPU cores with the offline defaults
    jobs: int = 1  # runs at once unless --jobs says otherwise (each with cpu_count / jobs threads)
    path: Path | None = field(default=None, compare=False)

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
        data.update({"base": dict(self.base), "grid": {k: list(v) for k, v in self.grid.items()},
                     "seeds": list(self.seeds), "verdict": {"metric": self.metric, "checks": list(self.checks)}})
        return data

    def verdict(self, runs: Sequence[RunResult]) -> Verdict:
        return evaluate(self.name, self.claim, self.checks, runs, self.metric)


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
    grid = data["grid"] or {}
    if not isinstance(base, Mapping) or not isinstance(grid, Mapping):
        raise SpecError(f"study {where}: 'base' and 'grid' must be mappings of train option: value(s)")
    for axis, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpecError(f"study {where}: grid axis {axis!r} must be a non-empty list of values")
    seeds = data.get("seeds", [0, 1, 2])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                              for s in seeds):
        raise SpecError(f"study {where}: 'seeds' must be a non-empty list of integers")
    verdict = data["verdict"]
    if not isinstance(verdict, Mapping) or not isinstance(verdict.get("checks"), list) or not verdict["checks"]:
        raise SpecError(f"study {where}: 'verdict' needs a non-empty list 'checks' (and optionally 'metric')")
    extra = [k for k in verdict if k not in ("metric", "checks")]
    if extra:
        raise SpecError(f"study {where}: unknown verdict key {extra[0]!r}; valid keys: metric, checks")
    checks = tuple(str(c) for c in verdict["checks"])
    for check in checks:
        # a check selects runs by any field the study sets: an axis of its grid, or one its base
        # fixes (an axis that `reslab study NAME --field VALUE` narrowed to one value moves there)
        parse_check(check, grid_fields=[*grid, *base])
    budget = data.get("budget_s")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0):
        raise SpecError(f"study {where}: 'budget_s' must be a positive number of seconds")
    jobs = data.get("jobs", 1)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise SpecError(f"study {where}: 'jobs' must be a positive integer (runs at once), got {jobs!r}")
    return Study(name=name, claim=claim, base=dict(base), grid={k: list(v) for k, v in grid.items()}, checks=checks,
                 seeds=tuple(seeds), metric=str(verdict.get("metric", DEFAULT_METRIC)),
                 source=str(data.get("source") or ""), notes=" ".join(str(data.get("notes") or "").split()),
                 budget_s=float(budget) if budget is not None else None, jobs=jobs)


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
    plan_grid = {k: v for k, v in study.grid.items() if k not in base and k not in grid}
    plan_grid.update(grid)
    plan_base = {k: v for k, v in study.base.items() if k not in plan_grid}
    plan_base.update(base)
    planned = replace(study, base=plan_base, grid=plan_grid, seeds=tuple(study.seeds if seeds is None else seeds))
    study_from_dict(planned.to_dict(), repr(study.name))
    return planned


def write_study(study: Study, directory: str | Path) -> Path:
    from .fileio import atomic_write_text

    return atomic_write_text(Path(directory) / STUDY_FILE, yaml.safe_dump(study.to_dict(), sort_keys=False))


__all__ = ["STUDY_FILE", "VERDICT_FILE", "Study", "get_study", "list_studies", "load_study_file", "plan_study",
           "read_study", "shipped_studies", "study_from_dict", "write_study"]
