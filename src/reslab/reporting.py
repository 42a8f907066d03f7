"""``reslab report DIR``: compare the runs of a sweep, grouped by what varies.

Every folder under DIR (up to two levels down) that holds a ``config.yaml`` is a
run.  Runs are grouped by the config fields whose values differ between them
(the seed and the fields that only say *where* or *how* a run executes never
define a group), and each group is summarised as mean ± sample std (ddof=1)
over its completed runs - the airbench way of reporting results.  Diverged and
failed runs are counted, never averaged: one NaN run must not hide behind a
mean, and must not drag it either.

The accuracy reported is the final epoch's.  A best-epoch accuracy appears only
when every run evaluates on a validation split (``--val-split``): the best epoch
of the test split is a choice made by looking at the test set, and its number
overstates what the model does on unseen data.  For other runs the CSV keeps the
``best_eval_acc_mean`` column, empty, so its columns never depend on the split.

Written into DIR (each file atomically: whole or absent):

- ``report.csv``     one row per group, accuracies as fractions (machine-readable)
- ``report.md``      the report: the table with accuracies in % with ±, the eval split, the plots
- ``train_loss.png`` train-loss curves per group (mean ± std over runs per epoch)
- ``eval_acc.png``   final eval accuracy per group, bars with ±std error bars
- ``report.html``    the same report as one self-contained page (inline CSS and base64 PNGs, no script)

The report is collected once, as a list of :class:`Section` s (paragraphs, lists,
tables, figures), and that one list is rendered to markdown and to HTML, so the
two files say the same thing.

A study directory (one holding the ``study.yaml`` it was run for) is named by its
study in the heading, and gets the study's verdict.  A study that quotes the
numbers its claim comes from (``reference``: the paper, its dataset, a value or
range per group) gets them beside the measured ones, in a "source %" column, with
a sentence saying where they come from - and whether on a different dataset, since
a number measured on ImageNet or CIFAR and one measured on a small offline subset
are comparable in trend only.  Measurements taken outside the runs (a timing, a
memory figure) placed in DIR as ``measurements.json`` are shown as their own
section, so one page carries the whole result.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import EXECUTION_FIELDS, TrainConfig
from .errors import SpecError
from .fileio import atomic_write_json, atomic_write_text
from .plots import plot_mean_bars, plot_mean_curves, series_style
from .rundir import CONFIG_FILE, SUMMARY_FILE, Run, RunDir, UnreadableRecord, is_run_dir, read_sweep_plan
from .studies import MEASUREMENTS_FILE, VERDICT_FILE, Study, is_fraction_metric, read_study
from .tables import format_table, format_value, table_cells
from .verdict import Verdict, matches_value, run_field

log = logging.getLogger(__name__)

# the seed and every field that says only where or how a run executes (channels_last, tensorboard, ...):
# the seed is what a group averages over; the rest say where or how a run executes, not what it computes
NEVER_GROUP = ("seed", *EXECUTION_FIELDS)
CONFIG_FIELDS = [f.name for f in fields(TrainConfig)]  # what a run's config holds, in TrainConfig's order
MAX_DEPTH = 2  # DIR/<run> and DIR/<sweep>/<run>
CSV_FILE, MD_FILE, HTML_FILE = "report.csv", "report.md", "report.html"
LOSS_PLOT, ACC_PLOT = "train_loss.png", "eval_acc.png"
STAT_COLUMNS = ("n", "completed", "diverged", "eval_acc_mean", "eval_acc_std", "best_eval_acc_mean",
                "train_loss_mean", "train_loss_std", "wall_time_s_mean")
REFERENCE_COLUMN = "reference"  # CSV column (and group row key) of a study's source number; only with one


@dataclass
class Report:
    """What ``report()`` found and wrote.  ``groups`` rows hold fractions (not %)."""

    directory: Path
    fields: list[str]  # the config fields that define the groups (TrainConfig names)
    groups: list[dict[str, Any]]  # one row per group: fields, then STAT_COLUMNS
    files: list[Path]
    eval_split: str  # "test", "val", or "test, val" when the runs disagree
    incomplete: int = 0  # runs without a summary.json, left out of every number
    runs: list[Run] = field(default_factory=list, repr=False)  # the finished runs the numbers come from
    verdict: Verdict | None = None  # a study directory's claim, judged from these runs
    setup: dict[str, Any] = field(default_factory=dict)  # what was held fixed, and the command that reruns it
    study: str | None = None  # the study's name when the directory is a study directory
    # the study's source numbers: {"source", "dataset", "metric", "groups": [{"where", "value"}]}; each group
    # row then holds REFERENCE_COLUMN: its value (a fraction, or (lo, hi)), or None where no entry matches it
    reference: dict[str, Any] | None = None
    measurements: list[dict[str, Any]] = field(default_factory=list)  # measurements.json (read_measurements)

    @property
    def shows_best(self) -> bool:
        """Whether a best-epoch accuracy is reported: only for runs that all evaluate on a validation split."""
        return _shows_best(self.eval_split)

    def format_table(self) -> str:
        """The report's table for the terminal: accuracies in %, mean ± std; the study's source numbers beside."""
        table = summary_table(self)
        return format_table(table.headers, table.rows, right=table.right)


def report(directory: str | Path, *, group_by: str | Sequence[str] | None = None,
           out: str | Path | None = None, confidence: float | None = None) -> Report:
    """Summarise the runs under ``directory``; write CSV, markdown, PNGs and HTML into ``out`` (default: it).

    ``group_by`` (field names, or one comma-separated string) replaces the
    automatic choice of the varied fields; ``[]`` pools every run into one group.
    In a study directory the claim is judged from the runs, at ``confidence``
    (default: the study's own), into ``verdict.json``.
    """
    root = Path(directory)
    found, finished = _finished_runs(root)
    group_fields = _resolve_group_by(group_by) if group_by is not None else varied_fields(finished)
    groups = _group(finished, group_fields)
    splits = sorted({str(r.summary.get("eval_split")) for r in finished if r.summary.get("eval_split")})
    eval_split = ", ".join(splits) or "test"
    if len(splits) > 1:
        log.warning("runs evaluate on different splits (%s): the accuracies are not comparable", eval_split)
    rows = [_row(key, runs, group_fields, best=_shows_best(eval_split)) for key, runs in groups]

    result = Report(directory=root, fields=group_fields, groups=rows, files=[], eval_split=eval_split,
                    incomplete=len(found) - len(finished), runs=finished)
    started = time.perf_counter()
    study = read_study(root)
    if study is not None:
        result.study = study.name
        result.verdict = study.verdict(finished, confidence)
        result.reference = study.reference
        if result.reference is not None:
            _attach_reference(result.reference, groups, rows)
    result.setup = describe_setup(root, finished, group_fields, study)
    result.measurements = read_measurements(root)
    dest = Path(out) if out is not None else root
    result.files = _write(result, groups, dest)
    log.info("report: %d runs in %d groups, written to %s in %.1fs", len(finished), len(rows), dest,
             time.perf_counter() - started)
    return result


def _finished_runs(root: Path) -> tuple[list[Run], list[Run]]:
    """Every run under ``root`` in sweep order, and those of them that have ended; a SpecError if none has."""
    if not root.is_dir():
        raise SpecError(f"report: {str(root)!r} is not a directory")
    found = _in_sweep_order(root, find_runs(root))
    finished = [r for r in found if r.summary is not None]
    if not finished:
        if found:
            raise SpecError(f"report: none of the {len(found)} runs in {str(root)!r} has finished (no {SUMMARY_FILE})")
        raise SpecError(f"report: no runs in {str(root)!r} (no folder with a {CONFIG_FILE})")
    incomplete = len(found) - len(finished)
    if incomplete:
        log.info("%d of %d runs have not finished (no %s) and are left out", incomplete, len(found), SUMMARY_FILE)
    for run in finished:
        if run.status == "failed":
            log.warning("run %s failed: %s", run.path, run.summary.get("error", "no error recorded"))
    return found, finished


def _write(result: Report, groups: list[tuple[tuple, list[Run]]], dest: Path) -> list[Path]:
    """The plots, the CSV, the report as markdown and as HTML, and a study's verdict.json, into ``dest``."""
    figures = _figures(result, groups, dest)
    sections = collect(result, figures)
    title = _title(result)
    footer = (f"Generated by reslab {__version__} from `{result.directory.resolve()}` on "
              f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}.")
    files = [atomic_write_text(dest / CSV_FILE, to_csv(result)),
             atomic_write_text(dest / MD_FILE, to_markdown(title, sections, footer)),
             *(f.path for f in figures),
             atomic_write_text(dest / HTML_FILE, to_html(title, sections, footer))]
    if result.verdict is not None:
        files.append(atomic_write_json(dest / VERDICT_FILE, result.verdict.to_dict()))
    return files


# --- what was run -----------------------------------------------------------------------------

# The settings a reader needs to know to judge the numbers, in this order.
MAX_CLASSES_SHOWN = 20  # class names listed in the setup; the rest counted
SETUP_FIELDS = ("model", "norm", "init", "dataset", "epochs", "batch_size", "optimizer", "lr", "lr_base_size",
                "momentum", "weight_decay", "schedule", "warmup_epochs", "label_smoothing", "val_split", "precision")


def describe_setup(root: Path, runs: list[Run], group_fields: list[str], study: Study | None) -> dict[str, Any]:
    """What the runs held fixed, their seeds, data sizes and versions, and the command that reruns them."""
    fixed = {}
    for name in SETUP_FIELDS:
        if name in group_fields:
            continue
        values = {_value(r, name) for r in runs}
        if len(values) == 1 and values != {None}:  # (None: an option left unset, e.g. no lr scaling)
            fixed[name] = next(iter(values))
    seeds = sorted({r.config.seed for r in runs})
    sizes = sorted({(r.summary.get("num_train"), r.summary.get("num_eval")) for r in runs
                    if r.summary.get("num_train") is not None})
    versions = sorted({(str(r.summary["versions"].get("reslab")), str(r.summary["versions"].get("torch")))
                       for r in runs if r.summary.get("versions")})
    devices = sorted({str(r.summary.get("device")) for r in runs if r.summary.get("device")})
    classes = sorted({tuple(c) for r in runs if (c := RunDir(r.path).read_classes())})
    return {"fixed": fixed, "varied": list(group_fields), "seeds": seeds, "sizes": sizes, "versions": versions,
            "devices": devices, "classes": [list(c) for c in classes], "command": _rerun_command(root, study)}


def _rerun_command(root: Path, study: Study | None) -> str:
    import shlex

    if study is not None:
        # the shipped study by name when it ran unchanged; else the copy it left, which is a study file itself
        from .studies import STUDY_FILE, shipped_studies

        shipped = shipped_studies().get(study.name)
        what = study.name if shipped is not None and shipped.to_dict() == study.to_dict() else str(root / STUDY_FILE)
        return f"reslab study {shlex.quote(what)} --out {shlex.quote(str(root))}"
    plan = read_sweep_plan(root)
    if plan is None:
        return f"reslab report {shlex.quote(str(root))}"
    parts = ["reslab", "sweep"]
    grid = plan.get("grid") or {}
    if not isinstance(grid, dict):  # a union of grids has no single command line
        return f"reslab sweep --config SWEEP.yaml --out {shlex.quote(str(root))}  # a union of grids"
    for name, value in {**(plan.get("base") or {}), **grid}.items():
        if isinstance(value, list):
            if any(isinstance(v, dict) for v in value):
                return f"reslab sweep --config SWEEP.yaml --out {shlex.quote(str(root))}  # policy mappings in the grid"
            value = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            value = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        parts += [f"--{str(name).replace('_', '-')}", shlex.quote(str(value))]
    parts += ["--seeds", ",".join(str(s) for s in plan.get("seeds") or [0]), "--out", shlex.quote(str(root))]
    return " ".join(parts)


# --- the report as sections: collected once, rendered to markdown and to HTML --------------------
# Text in paragraphs, list items and headings may mark `code` and **bold**, as markdown does; table cells
# are plain text.


@dataclass
class Paragraph:
    text: str
    style: str = ""  # how the page sets it apart: note, meta, warn, or the verdict's verdict-<result>
    id: str = ""


@dataclass
class Items:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    right: list[bool]  # per column: right-aligned (numbers)
    id: str = ""
    code: tuple[int, ...] = ()  # columns shown as code (a check's expression)


@dataclass
class Figure:
    path: Path  # a PNG beside the report
    alt: str  # what it shows, in a few words
    caption: str  # how to read it


Block = Paragraph | Items | Table | Figure


@dataclass
class Section:
    title: str  # "" for the lead, which has no heading
    blocks: list[Block] = field(default_factory=list)
    id: str = ""
    level: int = 2  # 3: a part of the level-2 section before it


def collect(result: Report, figures: list[Figure]) -> list[Section]:
    """Everything the report says, in reading order: the verdict first, then measurements, setup, results."""
    lead = [Paragraph(f"Directory: `{result.directory}`", "meta", "directory")] if result.study else []
    return [Section("", lead), *_verdict_sections(result), *_measurement_sections(result),
            Section("Setup", [Items(_setup_items(result))], "setup"), _results_section(result, figures)]


def _title(result: Report) -> str:
    """The page's name: the study it was run for, else its directory."""
    return f"reslab report: study {result.study}" if result.study else f"reslab report: {result.directory}"


def _verdict_sections(result: Report) -> list[Section]:
    v = result.verdict
    if v is None:
        return []
    headers, rows = v.table()
    terms = [f"`{t['term']}` = {t['value']}" for t in _verdict_terms(v)]
    return [Section("Verdict", [
        Paragraph(f"**{v.verdict}** at {100 * v.confidence:g}% confidence: {v.claim}",
                  f"verdict-{v.verdict.replace(' ', '-')}"),
        Paragraph(v.method_sentence(), "note"),
        Table(headers, rows, [False] * len(headers), "checks", code=(0,)),
        Paragraph("Group estimates, each with its interval:", "note"),
        Items(terms),
    ], "verdict")]


def _verdict_terms(v: Verdict) -> list[dict[str, Any]]:
    """Every group statistic the checks read, once, in the order first read."""
    seen: dict[str, dict[str, Any]] = {}
    for e in v.evidence:
        for t in e.terms:
            seen.setdefault(t["term"], t)
    return list(seen.values())


def _measurement_sections(result: Report) -> list[Section]:
    """A section of the measurements, each table a part of it with its own heading."""
    if not result.measurements:
        return []
    sections = [Section("Measurements", [], "measurements")]
    for table in result.measurements:
        blocks: list[Block] = [Paragraph(table["text"])] if table["text"] else []
        if table["headers"]:
            cells, right = table_cells(table["headers"], table["rows"])
            blocks.append(Table(table["headers"], cells, right))
        sections.append(Section(table["title"], blocks, level=3))
    return sections


def _setup_items(result: Report) -> list[str]:
    """The setup as sentences, each one item."""
    s = result.setup
    fixed = ", ".join(f"{k}=`{_label(v)}`" for k, v in s["fixed"].items()) or "nothing"
    lines = [f"Held fixed: {fixed}.",
             f"Varied: {', '.join(f'`{f}`' for f in s['varied']) or 'nothing'}; "
             f"seeds {', '.join(map(str, s['seeds']))}."]
    if s["sizes"]:
        lines.append("Data: " + "; ".join(f"{a:,} train / {b:,} eval images" for a, b in s["sizes"]) + ".")
    for names in s.get("classes", []):  # the dataset's own names for its labels 0, 1, ... (classes.json)
        shown = ", ".join(f"`{n}`" for n in names[:MAX_CLASSES_SHOWN])
        more = f" and {len(names) - MAX_CLASSES_SHOWN} more" if len(names) > MAX_CLASSES_SHOWN else ""
        lines.append(f"Classes ({len(names)}): {shown}{more}.")
    if s["versions"]:
        lines.append("Versions: " + "; ".join(f"reslab {a}, torch {b}" for a, b in s["versions"])
                     + (f"; device {', '.join(s['devices'])}" if s["devices"] else "") + ".")
    lines.append(f"Rerun: `{s['command']}`")
    return lines


def _results_section(result: Report, figures: list[Figure]) -> Section:
    runs, groups = len(result.runs), len(result.groups)
    varied = ", ".join(f"`{f}`" for f in result.fields) or "nothing (one group)"
    split = _split_word(result.eval_split)
    blocks: list[Block] = [
        Paragraph(f"{runs} run{'s' if runs != 1 else ''} in {groups} group{'s' if groups != 1 else ''}; "
                  f"grouped by {varied}.", "meta"),
        summary_table(result),
        Paragraph(_split_sentence(result.eval_split), "note" if split in ("test", "val") else "warn", "eval-split"),
        Paragraph(_method_note(result), "note"),
    ]
    if result.reference is not None:
        blocks.append(Paragraph(_reference_sentence(result), "note", "source-numbers"))
    return Section("Results", [*blocks, *figures], "results")


def summary_table(result: Report) -> Table:
    """One row per group: the fields that define it, counts, accuracy in % (mean ± std), the study's source
    number, train loss and wall time."""
    split = _split_word(result.eval_split)
    best = result.shows_best
    ref = result.reference
    headers = [*result.fields, "n", "completed", "diverged", f"{split} acc (%)",
               *([f"best {split} acc (%)"] if best else []), *([_source_header(ref)] if ref is not None else []),
               "final train loss", "wall time (s)"]
    rows = []
    for g in result.groups:
        wall = g["wall_time_s_mean"]
        rows.append([*(_label(g[f]) for f in result.fields), str(g["n"]), str(g["completed"]), str(g["diverged"]),
                     _pm(g["eval_acc_mean"], g["eval_acc_std"], 100, 2),
                     *([_pct(g["best_eval_acc_mean"])] if best else []),
                     *([_source_cell(ref, g.get(REFERENCE_COLUMN))] if ref is not None else []),
                     _pm(g["train_loss_mean"], g["train_loss_std"], 1, 4), "-" if wall is None else f"{wall:.1f}"])
    right = [i >= len(result.fields) for i in range(len(headers))]
    return Table(headers, rows, right, "summary")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Items):
        return [f"- {item}" for item in block.items]
    if isinstance(block, Table):
        rows = [[f"`{c}`" if i in block.code else c for i, c in enumerate(row)] for row in block.rows]
        return [_md_row(block.headers), _md_row(["---:" if r else "---" for r in block.right]),
                *(_md_row(r) for r in rows)]
    return [f"![{block.alt}]({block.path.name})", "", block.caption]


def to_markdown(title: str, sections: list[Section], footer: str) -> str:
    """The report as markdown: the figures are the PNGs beside it."""
    lines = [f"# {title}", ""]
    for section in sections:
        if section.title:
            lines += [f"{'#' * section.level} {section.title}", ""]
        for block in section.blocks:
            lines += [*_markdown_block(block), ""]
    return "\n".join([*lines, footer, ""])


_INLINE = re.compile(r"`([^`]+)`|\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    """Text as HTML: escaped, its `code` and **bold** marked up."""
    out, pos = [], 0
    for match in _INLINE.finditer(text):
        code, bold = match.groups()
        out += [html.escape(text[pos:match.start()]),
                f"<code>{html.escape(code)}</code>" if code is not None else f"<strong>{html.escape(bold)}</strong>"]
        pos = match.end()
    return "".join([*out, html.escape(text[pos:])])


def _attrs(**values: str) -> str:
    return "".join(f' {name}="{html.escape(value)}"' for name, value in values.items() if value)


def _html_block(block: Block) -> str:
    esc = html.escape
    if isinstance(block, Paragraph):
        return f"<p{_attrs(**{'class': block.style, 'id': block.id})}>{_inline(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        head = "".join(f'<th scope="col">{esc(h)}</th>' for h in block.headers)
        body = "\n".join("<tr>" + "".join(
            f"<td{' class=num' if r else ''}>{f'<code>{esc(c)}</code>' if i in block.code else esc(c)}</td>"
            for i, (c, r) in enumerate(zip(row, block.right, strict=True))) + "</tr>" for row in block.rows)
        return f"<table{_attrs(id=block.id)}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{esc(block.alt)}">'
            f"<figcaption>{esc(block.caption)}</figcaption></figure>")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       padding: 0 1rem; color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
p.meta { color: #555; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.65rem; }
th { background: #f0f0f0; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption { color: #555; font-size: 0.9rem; }
.note { color: #555; font-size: 0.9rem; }
.warn { color: #a40000; }
.verdict-supported strong { color: #116611; } .verdict-not-supported strong { color: #a40000; }
.verdict-inconclusive strong { color: #8a6d00; }
"""


def to_html(title: str, sections: list[Section], footer: str) -> str:
    """The report as one self-contained page: inline CSS, the figures as base64 data URIs, nothing external."""
    body, open_section = [], False
    for section in sections:
        if section.level <= 2 and open_section:
            body.append("</section>")
            open_section = False
        if section.title and section.level <= 2:
            body.append(f"<section{_attrs(id=section.id)}><h2>{_inline(section.title)}</h2>")
            open_section = True
        elif section.title:
            body.append(f"<h{section.level}>{_inline(section.title)}</h{section.level}>")
        body += [_html_block(block) for block in section.blocks]
    if open_section:
        body.append("</section>")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{chr(10).join(body)}
<p class="note" id="generated">{_inline(footer)}</p>
</body>
</html>
"""


# --- a study's source numbers ------------------------------------------------------------------
# The study validated them when it was read (reslab.studies): each entry a ``where`` (field: value) and a
# value, a number or [low, high].


def _attach_reference(reference: dict[str, Any], groups: list[tuple[tuple, list[Run]]],
                      rows: list[dict[str, Any]]) -> None:
    """Give each group row the value of the first reference entry whose ``where`` all its runs satisfy.

    Matching on the runs (not on the group's key) lets an entry name a field the
    study holds fixed, which is no column of the table; an entry that selects no
    group - a study run over part of its grid - is only logged.
    """
    used = [False] * len(reference["groups"])
    for (_, runs), row in zip(groups, rows, strict=True):
        hits = [i for i, e in enumerate(reference["groups"])
                if all(matches_value(_value(r, k), v) for r in runs for k, v in e["where"].items())]
        for i in hits:
            used[i] = True
        if len(hits) > 1:
            log.warning("study reference: %d entries match one group; the first (%r) is shown", len(hits),
                        reference["groups"][hits[0]]["where"])
        value = reference["groups"][hits[0]]["value"] if hits else None
        row[REFERENCE_COLUMN] = tuple(value) if isinstance(value, list) else value  # a range as (lo, hi)
    for entry, hit in zip(reference["groups"], used, strict=True):
        if not hit:
            log.info("study reference: no group of these runs matches %r", entry["where"])


def _source_header(reference: dict[str, Any]) -> str:
    return "source %" if is_fraction_metric(reference["metric"]) else "source"


def _source_cell(reference: dict[str, Any] | None, value: float | tuple[float, float] | None) -> str:
    """A source number as the table shows it: 85.2, or a range 85.2-85.8; "" where the source has none.

    Trailing zeros are dropped: a paper's "85.2" printed as "85.20" claims a digit it never gave.
    """
    if reference is None or value is None:
        return ""
    if is_fraction_metric(reference["metric"]):
        def one(v: float) -> str:
            return f"{100 * v:.2f}".rstrip("0").rstrip(".")
    else:
        def one(v: float) -> str:
            return format_value(v)
    return one(value) if not isinstance(value, tuple) else f"{one(value[0])}-{one(value[1])}"


def _reference_csv(value: float | tuple[float, float] | None) -> str:
    if value is None:
        return ""
    return repr(value) if not isinstance(value, tuple) else f"{value[0]!r}-{value[1]!r}"


def _normalized(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def _reference_sentence(result: Report) -> str:
    """Where the source numbers come from, and whether from a different dataset than these runs.

    A number from another dataset (the paper's ImageNet, these runs' small offline
    subset) says how the groups should rank and differ, not what they should score.
    """
    ref = result.reference
    if ref is None:
        return ""
    source = ref["source"] or "the study's source"
    if not ref["dataset"]:
        return f"Source numbers: {source}."
    datasets = sorted({str(_value(r, "dataset")) for r in result.runs})
    if [_normalized(ref["dataset"])] == [_normalized(d) for d in datasets]:
        return f"Source numbers: {source}, on {ref['dataset']}, the dataset of these runs."
    return (f"Source numbers: {source}, on {ref['dataset']} - a different dataset from these runs' "
            f"{', '.join(datasets)}, so compare how the groups rank and differ, not the values themselves.")


# --- measurements taken outside the runs -------------------------------------------------------


def read_measurements(directory: str | Path) -> list[dict[str, Any]]:
    """The tables of ``measurements.json`` in ``directory``: ``[{"title", "text", "headers", "rows"}]``.

    Numbers measured outside the runs (a timing, a memory peak) belong on the same
    page as the runs' results.  A missing file is no measurements; an unreadable or
    malformed one is logged as a warning and left out, so the report is still written.
    """
    file = Path(directory) / MEASUREMENTS_FILE
    if not file.is_file():
        return []
    try:
        return _check_measurements(json.loads(file.read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # (json.JSONDecodeError is a ValueError)
        log.warning("%s left out of the report: %s", file, exc)
        return []


def _check_measurements(data: Any) -> list[dict[str, Any]]:
    """``data`` as a list of measurement tables; ValueError naming the first thing out of shape."""
    if not isinstance(data, list):
        raise ValueError(f"expected a list of tables, got {type(data).__name__}")
    tables = []
    for i, item in enumerate(data):
        where = f"table {i}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected an object with title, text, headers, rows")
        title, text = item.get("title"), item.get("text", "")
        headers, rows = item.get("headers", []), item.get("rows", [])
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"{where}: 'title' must be a non-empty string")
        if not isinstance(text, str):
            raise ValueError(f"{where}: 'text' must be a string")
        if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
            raise ValueError(f"{where}: 'headers' must be a list of strings")
        if not isinstance(rows, list):
            raise ValueError(f"{where}: 'rows' must be a list of rows")
        for j, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(headers):
                raise ValueError(f"{where}, row {j}: expected a list of {len(headers)} cells (one per header)")
            bad = [c for c in row if c is not None and not isinstance(c, (str, int, float))]
            if bad:
                raise ValueError(f"{where}, row {j}: cells must be text or numbers, got {bad[0]!r}")
        tables.append({"title": " ".join(title.split()), "text": " ".join(text.split()),
                       "headers": list(headers), "rows": [list(r) for r in rows]})
    return tables


# --- finding and reading runs ---------------------------------------------------------


def _in_sweep_order(root: Path, runs: list[Run]) -> list[Run]:
    """Runs in the order their sweep listed them (its ``sweep.yaml``), so text values
    such as init names keep the order the study chose; path order otherwise."""
    run_ids = (read_sweep_plan(root) or {}).get("runs")
    if not isinstance(run_ids, list):
        return runs
    order = {str(run_id): i for i, run_id in enumerate(run_ids)}
    return sorted(runs, key=lambda r: order.get(r.run_id, len(order)))


def find_runs(root: Path) -> list[Run]:
    """Every run directory at ``root`` or up to MAX_DEPTH levels below it, in path order."""
    runs: list[Run] = []

    def visit(folder: Path, depth: int) -> None:
        if is_run_dir(folder):
            run = _read_run(folder)
            if run is not None:
                runs.append(run)
            return  # a run directory holds no runs
        if depth == MAX_DEPTH:
            return
        for child in sorted(folder.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                visit(child, depth + 1)

    visit(root, 0)
    return runs


def _read_run(folder: Path) -> Run | None:
    """The run in ``folder``, or None (with a warning) where its config.yaml cannot be read as a config."""
    try:
        run = Run.read(folder)
    except UnreadableRecord as exc:
        log.warning("skipping %s: unreadable %s (%s)", folder, CONFIG_FILE, exc.reason)
        return None
    if run.summary is None and (folder / SUMMARY_FILE).is_file():
        log.warning("%s: unreadable %s; counted as not finished", folder, SUMMARY_FILE)
    return run


# --- grouping ------------------------------------------------------------------------------


def _value(run: Run, name: str) -> Any:
    """A run's config field, hashable (a policy mapping as JSON text)."""
    value = run_field(run, name)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def varied_fields(runs: list[Run]) -> list[str]:
    """The config fields (besides NEVER_GROUP) that do not hold one value across ``runs``."""
    return [n for n in CONFIG_FIELDS if n not in NEVER_GROUP and len({_value(r, n) for r in runs}) > 1]


def _resolve_group_by(group_by: str | Sequence[str]) -> list[str]:
    requested = group_by.split(",") if isinstance(group_by, str) else list(group_by)
    resolved = []
    for item in requested:
        name = str(item).strip().lstrip("-").replace("-", "_")
        if not name:
            continue
        if name not in CONFIG_FIELDS:
            raise SpecError(f"report: unknown --group-by field {str(item).strip()!r}; "
                            f"valid fields: {', '.join(CONFIG_FIELDS)}")
        if name not in resolved:
            resolved.append(name)
    return resolved


def _value_order(runs: list[Run], name: str) -> dict[Any, tuple]:
    """Rank of each value of a field: numbers ascending, everything else in order of first appearance."""
    seen: list[Any] = []
    for run in runs:
        value = _value(run, name)
        if value not in seen:
            seen.append(value)

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    numbers = sorted(v for v in seen if is_number(v))
    others = [v for v in seen if not is_number(v)]
    # None (the field's "default") first, then numbers by value, then the rest as they appear
    ordered = [v for v in others if v is None] + numbers + [v for v in others if v is not None]
    return {v: (i,) for i, v in enumerate(ordered)}


def _group(runs: list[Run], group_fields: list[str]) -> list[tuple[tuple, list[Run]]]:
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(_value(run, n) for n in group_fields), []).append(run)
    orders = [_value_order(runs, n) for n in group_fields]
    return sorted(groups.items(), key=lambda item: tuple(o[v] for o, v in zip(orders, item[0], strict=True)))


# --- statistics --------------------------------------------------------------------------


def _finite(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None (an empty cell) for fewer than two runs."""
    return statistics.stdev(values) if len(values) >= 2 else None


def _row(key: tuple, runs: list[Run], group_fields: list[str], *, best: bool) -> dict[str, Any]:
    """One group's statistics; ``best``: whether the best-epoch accuracy may be reported (a validation split)."""
    completed = [r for r in runs if r.status == "completed"]  # the only runs the means average

    def stat(name: str) -> list[float]:
        return _finite([r.summary.get(name) for r in completed])

    acc, loss = stat("final_eval_acc"), stat("final_train_loss")
    return {
        **dict(zip(group_fields, key, strict=True)),
        "n": len(runs),
        "completed": len(completed),
        "diverged": sum(r.status == "diverged" for r in runs),
        "eval_acc_mean": _mean(acc),
        "eval_acc_std": _std(acc),
        "best_eval_acc_mean": _mean(stat("best_eval_acc")) if best else None,
        "train_loss_mean": _mean(loss),
        "train_loss_std": _std(loss),
        "wall_time_s_mean": _mean(stat("wall_time_s")),
    }


def _loss_curve(runs: list[Run]) -> dict[str, list[float]] | None:
    """Mean and sample std of the train loss over the completed runs, at each point they share.

    Per logged step (``steps.jsonl``, x in fractional epochs) where every completed run
    recorded steps; per epoch (``metrics.jsonl``) otherwise."""
    completed = [r for r in runs if r.status == "completed"]
    per_epoch: dict[float, list[float]] = {}
    by_step = bool(completed) and all(r.steps for r in completed)
    for run in completed:
        for row in (run.steps if by_step else run.metrics):
            loss = _finite([row.get("loss" if by_step else "train_loss")])
            x = row.get("epoch")
            if loss and isinstance(x, (int, float)) and not isinstance(x, bool):
                per_epoch.setdefault(x, []).extend(loss)
    if not per_epoch:
        return None
    epochs = sorted(per_epoch)
    return {
        "x": epochs,
        "mean": [statistics.fmean(per_epoch[e]) for e in epochs],
        "std": [s if (s := _std(per_epoch[e])) is not None else math.nan for e in epochs],
    }


# --- formatting ----------------------------------------------------------------------------


def _label(value: Any) -> str:
    """A config value as the CLI spells it: true/false, 'default' for None."""
    if value is None:
        return "default"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _pm(mean: float | None, std: float | None, scale: float, digits: int) -> str:
    if mean is None:
        return "-"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _shows_best(eval_split: str) -> bool:
    """A best-epoch accuracy is selection on the split it is measured on: honest on validation data only."""
    return eval_split == "val"


def _split_word(eval_split: str) -> str:
    """The accuracy's name: test, val - or eval when the runs mix splits."""
    return eval_split if eval_split in ("test", "val") else "eval"


def _split_sentence(eval_split: str) -> str:
    if eval_split == "test":
        return "Accuracy is measured on the **test** split."
    if eval_split == "val":
        return "Accuracy is measured on a **validation** split held out of the training data (not the test split)."
    return f"Warning: the runs evaluate on different splits ({eval_split}); their accuracies are not comparable."


def _group_label(row: dict[str, Any], group_fields: list[str]) -> str:
    if not group_fields:
        return "all runs"
    return ", ".join(_label(row[f]) for f in group_fields)


def _method_note(result: Report) -> str:
    failed = sum(r.status == "failed" for r in result.runs)
    note = ("Mean ± sample standard deviation (ddof=1) over the completed runs of each group, final epoch; "
            "no ± with fewer than two completed runs. Diverged and failed runs count in n but not in the means.")
    if result.shows_best:
        note += (" Best val acc: the mean over runs of each run's best epoch on the validation split "
                 "(epoch selection on validation data, never on the test split).")
    else:
        what = "the test split" if result.eval_split == "test" else f"more than one split ({result.eval_split})"
        note += (f" No best-epoch accuracy: the runs evaluate on {what}, and picking the best epoch on the test "
                 "split is selection on the test set, which overstates the accuracy; the final-epoch number is "
                 "the honest one. Train with --val-split for a best epoch chosen on data held out of training.")
    if failed:
        note += f" {failed} run{'s' if failed != 1 else ''} failed (n - completed - diverged)."
    if result.incomplete:
        runs = "run" if result.incomplete == 1 else "runs"
        note += f" {result.incomplete} unfinished {runs} (no summary.json) left out."
    return note


def to_csv(result: Report) -> str:
    """One row per group, fractions unrounded; a study's source number last (``reference``), after the
    columns every report has, so a reader that indexes those columns reads the same ones either way."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    ref = result.reference is not None
    writer.writerow([*result.fields, *STAT_COLUMNS, *([REFERENCE_COLUMN] if ref else [])])
    for g in result.groups:
        writer.writerow([_csv_value(g[c]) for c in (*result.fields, *STAT_COLUMNS)]
                        + ([_reference_csv(g.get(REFERENCE_COLUMN))] if ref else []))
    return buffer.getvalue()


# --- plots -----------------------------------------------------------------------------------


def _figures(result: Report, groups: list[tuple[tuple, list[Run]]], dest: Path) -> list[Figure]:
    """The report's two plots, drawn into ``dest``: train loss over training, final accuracy per group."""
    labels = [_group_label(row, result.fields) for row in result.groups]
    split = _split_word(result.eval_split)
    loss = _plot_losses(groups, labels, result.fields, dest / LOSS_PLOT)
    acc = _plot_accuracy(result.groups, labels, result.fields, result.eval_split, dest / ACC_PLOT)
    return [
        Figure(loss, "train loss over training per group (mean ± std over runs)",
               "Training loss over training for each group (per logged step where runs recorded steps.jsonl, "
               "else per epoch): mean over completed runs, shaded band ±1 std."),
        Figure(acc, f"final {split} accuracy per group (bars with standard-deviation error bars)",
               f"Final {split} accuracy per group: mean over completed runs, error bars ±1 std."),
    ]


def _lost_counts(diverged: int, failed: int) -> str:
    return ", ".join(f"{k} {what}" for k, what in ((diverged, "diverged"), (failed, "failed")) if k)


def _lost(runs: list[Run]) -> str:
    return _lost_counts(sum(r.status == "diverged" for r in runs), sum(r.status == "failed" for r in runs))


def _legend_title(group_fields: list[str]) -> str:
    return ", ".join(group_fields)


def _plot_losses(groups: list[tuple[tuple, list[Run]]], labels: list[str], group_fields: list[str],
                 path: Path) -> Path:
    series, left_out = [], []
    for i, ((_, runs), label) in enumerate(zip(groups, labels, strict=True)):
        curve = _loss_curve(runs)
        excluded = sum(r.status != "completed" for r in runs)
        if curve is None:
            left_out.append(f"{label} ({_lost(runs) or 'no metrics'})")
            continue
        n = sum(r.status == "completed" for r in runs)
        suffix = f" ({n} run{'s' if n != 1 else ''}" + (f"; {_lost(runs)} not shown)" if excluded else ")")
        series.append({"label": label + suffix, "style": series_style(i), **curve})
    note = ("not shown: " + "; ".join(left_out)) if left_out else ""
    return plot_mean_curves(series, path, title="Training loss (mean ± std over completed runs)",
                            xlabel="epoch", ylabel="train loss", legend_title=_legend_title(group_fields), note=note)


def _plot_accuracy(rows: list[dict[str, Any]], labels: list[str], group_fields: list[str], eval_split: str,
                   path: Path) -> Path:
    split = _split_word(eval_split)
    means = [None if r["eval_acc_mean"] is None else 100 * r["eval_acc_mean"] for r in rows]
    stds = [None if r["eval_acc_std"] is None else 100 * r["eval_acc_std"] for r in rows]
    notes = [_lost_counts(r["diverged"], r["n"] - r["completed"] - r["diverged"]) for r in rows]
    return plot_mean_bars(labels, means, stds, path, title=f"Final {split} accuracy (mean ± std over completed runs)",
                          xlabel=_legend_title(group_fields) or "all runs", ylabel=f"{split} accuracy (%)",
                          notes=notes, ylim=(0.0, 100.0))
