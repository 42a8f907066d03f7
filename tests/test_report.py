"""reslab report: grouping, exact statistics, the files it writes, what a reader of the page gets, bad input."""

import base64
import csv
import io
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import textwrap
from html.parser import HTMLParser

import matplotlib.image as mpimg
import numpy as np
import pytest

from reslab.config import TrainConfig
from reslab.errors import SpecError
from reslab.reporting import NEVER_GROUP, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(root, name, *, status="completed", acc=None, loss=None, wall=10.0, epochs=3, eval_split="test",
             summary=True, best=None, **config):
    """A run directory as ``reslab train`` leaves it: config.yaml, metrics.jsonl, summary.json.

    The summary records a best epoch's accuracy (``best``, default the highest eval_acc)
    whatever the split, as older runs did for the test split too: the report must not show it there.
    """
    run = root / name
    run.mkdir(parents=True)
    cfg = TrainConfig(**{"out": str(run), "epochs": epochs, **config})
    (run / "config.yaml").write_text(cfg.to_yaml() + "# world_size: 1\n# per_device_batch: 128\n")
    done = epochs if status == "completed" else epochs - 1
    rows = []
    for e in range(1, done + 1):  # loss falls to `loss` at the last epoch, accuracy rises to `acc`
        rows.append({"epoch": e, "train_loss": loss * (epochs - e + 1), "train_acc": 0.5, "eval_loss": 1.0,
                     "eval_acc": acc - 0.01 * (epochs - e), "lr": 0.1, "epoch_time_s": 1.0, "images_per_s": 1000.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        (run / "summary.json").write_text(json.dumps({
            "status": status, "epochs_completed": done, "epochs": epochs,
            "final_eval_acc": rows[-1]["eval_acc"] if rows else None,
            "best_eval_acc": best if best is not None else max((r["eval_acc"] for r in rows), default=None),
            "final_train_loss": rows[-1]["train_loss"] if rows else None,
            "eval_split": eval_split, "wall_time_s": wall,
        }))
    return run


# zeros: seed 2 diverges (its numbers would pull the mean far down if they counted);
# kaiming_normal: three completed runs, plus one that never finished (no summary).
ZEROS = {0: (0.40, 1.50, 11.0), 1: (0.46, 1.40, 13.0), 2: (0.10, 2.30, 5.0)}
KAIMING = {0: (0.9712, 0.100, 20.0), 1: (0.9683, 0.120, 22.0), 2: (0.9751, 0.090, 21.0)}


@pytest.fixture
def init_sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed, (acc, loss, wall) in ZEROS.items():
        make_run(root, f"init-zeros-seed{seed}", init="zeros", seed=seed, acc=acc, loss=loss, wall=wall,
                 status="diverged" if seed == 2 else "completed", device="cuda:0" if seed else "cpu")
    for seed, (acc, loss, wall) in KAIMING.items():
        make_run(root, f"init-kaiming_normal-seed{seed}", init="kaiming_normal", seed=seed, acc=acc, loss=loss,
                 wall=wall)
    make_run(root, "init-kaiming_normal-seed3", init="kaiming_normal", seed=3, acc=0.5, loss=9.0, summary=False)
    return root


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class Page(HTMLParser):
    """What a reader of an HTML page gets: its title, headings, paragraphs, list items, every table (its
    section, headers and rows of cell text) and every figure (image source, alt text, caption)."""

    TEXT = ("title", "h1", "h2", "h3", "p", "li", "th", "td", "figcaption")

    def __init__(self, text):
        super().__init__()
        self.title, self.headings, self.paragraphs, self.items = "", [], [], []
        self.tables, self.figures, self.sections, self.scripts = [], [], [], 0
        self._text, self._section, self._body = None, None, False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "script":
            self.scripts += 1
        elif tag == "section":
            self._section = attrs.get("id")
            self.sections.append(self._section)
        elif tag == "table":
            self.tables.append({"id": attrs.get("id"), "section": self._section, "headers": [], "rows": []})
        elif tag == "tbody":
            self._body = True
        elif tag == "tr" and self._body:
            self.tables[-1]["rows"].append([])
        elif tag == "img":
            self.figures.append({"src": attrs.get("src", ""), "alt": attrs.get("alt", ""), "caption": ""})
        if tag in self.TEXT:
            self._text = []

    def handle_data(self, data):
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        elif tag == "tbody":
            self._body = False
        if tag not in self.TEXT or self._text is None:
            return
        text, self._text = " ".join("".join(self._text).split()), None
        if tag == "th":
            self.tables[-1]["headers"].append(text)
        elif tag == "td":
            self.tables[-1]["rows"][-1].append(text)
        elif tag == "figcaption":
            self.figures[-1]["caption"] = text
        elif tag == "title":
            self.title = text
        elif tag in ("h1", "h2", "h3"):
            self.headings.append((int(tag[1]), text))
        else:
            (self.paragraphs if tag == "p" else self.items).append(text)

    def table(self, table_id):
        return next(t for t in self.tables if t["id"] == table_id)


def read_page(path):
    return Page(path.read_text())


def markdown_tables(md):
    """Every table of a markdown text as (headers, rows), cells as a reader sees them (no code marks)."""
    tables, lines = [], md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("| ") and (i == 0 or not lines[i - 1].startswith("|")):
            block = []
            for row in lines[i:]:
                if not row.startswith("|"):
                    break
                block.append([c.strip().replace("\\|", "|").strip("`") for c in re.split(r"(?<!\\)\|", row)[1:-1]])
            tables.append((block[0], block[2:]))
    return tables


def png_pixels(data):
    """A PNG's pixels (RGB, 0-1); fails unless the bytes decode as a PNG."""
    assert data[:8] == PNG_MAGIC
    return mpimg.imread(io.BytesIO(data), format="png")[..., :3]


def test_csv_has_exact_means_stds_and_counts(init_sweep, caplog):
    with caplog.at_level("INFO", logger="reslab.reporting"):
        result = report(init_sweep)
    assert "1 of 7 runs have not finished" in caplog.text
    rows = read_csv(init_sweep / "report.csv")
    # only init varies: seed, out and device differ between runs but never define a group
    assert result.fields == ["init"]
    assert list(rows[0]) == ["init", "n", "completed", "diverged", "eval_acc_mean", "eval_acc_std",
                             "best_eval_acc_mean", "train_loss_mean", "train_loss_std", "wall_time_s_mean"]
    assert [r["init"] for r in rows] == ["kaiming_normal", "zeros"]  # order of first appearance (sorted run ids)
    kaiming, zeros = rows

    acc = [a for a, _, _ in KAIMING.values()]
    loss = [lo for _, lo, _ in KAIMING.values()]
    assert (kaiming["n"], kaiming["completed"], kaiming["diverged"]) == ("3", "3", "0")  # unfinished run not counted
    assert float(kaiming["eval_acc_mean"]) == pytest.approx(statistics.fmean(acc), abs=1e-12)
    assert float(kaiming["eval_acc_std"]) == pytest.approx(statistics.stdev(acc), abs=1e-12)
    assert kaiming["best_eval_acc_mean"] == ""  # test split: no best epoch (that would be selection on test)
    assert float(kaiming["train_loss_mean"]) == pytest.approx(statistics.fmean(loss), abs=1e-12)
    assert float(kaiming["train_loss_std"]) == pytest.approx(statistics.stdev(loss), abs=1e-12)
    assert float(kaiming["wall_time_s_mean"]) == pytest.approx(21.0)

    kept = [ZEROS[0], ZEROS[1]]  # seed 2 diverged: counted, not averaged
    assert (zeros["n"], zeros["completed"], zeros["diverged"]) == ("3", "2", "1")
    assert float(zeros["eval_acc_mean"]) == pytest.approx(statistics.fmean(a for a, _, _ in kept), abs=1e-12)
    assert float(zeros["eval_acc_std"]) == pytest.approx(statistics.stdev([a for a, _, _ in kept]), abs=1e-12)
    assert float(zeros["train_loss_mean"]) == pytest.approx(statistics.fmean(lo for _, lo, _ in kept), abs=1e-12)
    assert float(zeros["train_loss_std"]) == pytest.approx(statistics.stdev([lo for _, lo, _ in kept]), abs=1e-12)
    assert float(zeros["wall_time_s_mean"]) == pytest.approx(12.0)

    assert result.groups[1]["eval_acc_mean"] == pytest.approx(0.43)
    assert result.incomplete == 1
    assert {p.name for p in result.files} == {"report.csv", "report.md", "report.html", "train_loss.png",
                                              "eval_acc.png"}
    table = result.format_table()
    assert "97.15 ± 0.34" in table and "43.00 ± 4.24" in table and "test acc (%)" in table
    assert "best" not in table


def test_std_is_empty_with_one_completed_run_and_means_empty_with_none(tmp_path):
    make_run(tmp_path, "a", norm="bn", acc=0.8, loss=0.5)
    make_run(tmp_path, "b", norm="gn", acc=0.1, loss=2.0, status="diverged")
    make_run(tmp_path, "c", norm="gn", acc=0.1, loss=2.0, status="failed")
    report(tmp_path)
    bn, gn = read_csv(tmp_path / "report.csv")
    assert bn["eval_acc_mean"] == "0.8" and bn["eval_acc_std"] == "" and bn["train_loss_std"] == ""
    assert (gn["n"], gn["completed"], gn["diverged"]) == ("2", "0", "1")  # the failed run: n - completed - diverged
    assert all(gn[c] == "" for c in ("eval_acc_mean", "eval_acc_std", "train_loss_mean", "wall_time_s_mean"))
    md = (tmp_path / "report.md").read_text()
    assert "1 run failed" in md


def test_groups_by_every_varied_field_numbers_in_numeric_order(tmp_path):
    for norm in ("gn", "bn"):
        for bs in (1024, 128, 32):
            for seed in (0, 1):
                make_run(tmp_path / "bs", f"{norm}-bs{bs}-seed{seed}", norm=norm, batch_size=bs, seed=seed,
                         acc=0.9 - bs / 1e4 - 0.01 * seed, loss=0.2 + seed / 100)
    result = report(tmp_path)  # runs sit one level further down: DIR/bs/<run>
    assert result.fields == ["norm", "batch_size"]  # TrainConfig's order, flag names with underscores
    assert [(g["norm"], g["batch_size"]) for g in result.groups] == [
        ("bn", 32), ("bn", 128), ("bn", 1024), ("gn", 32), ("gn", 128), ("gn", 1024)]
    rows = read_csv(tmp_path / "report.csv")
    assert [r["batch_size"] for r in rows] == ["32", "128", "1024", "32", "128", "1024"]
    assert all(r["n"] == "2" for r in rows)
    assert not set(NEVER_GROUP) & set(rows[0])


@pytest.mark.slow
def test_group_by_overrides_and_nothing_varied_is_one_group(init_sweep, tmp_path):
    pooled = report(init_sweep, group_by=[])
    assert pooled.fields == [] and len(pooled.groups) == 1 and pooled.groups[0]["n"] == 6
    by_seed = report(init_sweep, group_by="seed")
    assert [g["seed"] for g in by_seed.groups] == [0, 1, 2]
    assert [g["n"] for g in by_seed.groups] == [2, 2, 2]
    both = report(init_sweep, group_by=["init", "batch-size"])  # flag spelling accepted
    assert both.fields == ["init", "batch_size"]

    for seed in range(3):
        make_run(tmp_path / "same", f"s{seed}", seed=seed, acc=0.5 + seed / 100, loss=1.0)
    single = report(tmp_path / "same")
    assert single.fields == [] and len(single.groups) == 1
    row = read_csv(tmp_path / "same" / "report.csv")[0]
    assert row["n"] == "3" and float(row["eval_acc_std"]) == pytest.approx(statistics.stdev([0.5, 0.51, 0.52]))


def test_markdown_table_and_eval_split(init_sweep, tmp_path):
    report(init_sweep)
    md = (init_sweep / "report.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| init"))
    assert header == "| init | n | completed | diverged | test acc (%) | final train loss | wall time (s) |"
    assert "| kaiming_normal | 3 | 3 | 0 | 97.15 ± 0.34 | 0.1033 ± 0.0153 | 21.0 |" in lines
    assert "| zeros | 3 | 2 | 1 | 43.00 ± 4.24 | 1.4500 ± 0.0707 | 12.0 |" in lines
    assert "**test** split" in md and "valid" not in md.lower()
    assert "sample standard deviation (ddof=1)" in md
    assert "1 unfinished run" in md

    make_run(tmp_path / "val", "a", acc=0.9, loss=0.3, val_split=0.1, eval_split="val")
    report(tmp_path / "val")
    md = (tmp_path / "val" / "report.md").read_text()
    assert "val acc (%)" in md and "validation" in md and "test acc" not in md


def _headers(result, root):
    """The column headers of the summary table in the terminal, report.md and report.html
    (the summary, not a measurements table that may come first)."""
    table = result.format_table().splitlines()[0].split("  ")
    md = next(headers for headers, _ in markdown_tables((root / "report.md").read_text()) if "completed" in headers)
    return [c.strip() for c in table if c.strip()], md, read_page(root / "report.html").table("summary")["headers"]


@pytest.mark.slow
def test_best_epoch_accuracy_only_for_a_validation_split(tmp_path):
    # Each run's best epoch (0.95, 0.97) beats its final one (0.90, 0.92): on the test split
    # that best number is selection on the test set and must appear nowhere.
    for split in ("test", "val"):
        for seed, (acc, best) in enumerate([(0.90, 0.95), (0.92, 0.97)]):
            make_run(tmp_path / split, f"s{seed}", seed=seed, acc=acc, best=best, loss=0.5, eval_split=split,
                     val_split=0.1 if split == "val" else 0.0)

    test = report(tmp_path / "test")
    assert test.groups[0]["best_eval_acc_mean"] is None
    table, md_header, html_header = _headers(test, tmp_path / "test")
    for headers in (table, md_header, html_header):
        assert "test acc (%)" in headers
        assert not [h for h in headers if "best" in h], headers
    md = (tmp_path / "test" / "report.md").read_text()
    page = (tmp_path / "test" / "report.html").read_text()
    assert "95.00" not in md and "96.00" not in md and "96.00" not in page  # the best epochs' mean, 96%
    assert "91.00 ± 1.41" in md  # the final epoch: mean 91%, std sqrt(2) points
    for text in (md, page):
        assert "selection on the test set" in text and "final-epoch number is the honest one" in text
    row = read_csv(tmp_path / "test" / "report.csv")[0]
    assert row["best_eval_acc_mean"] == "" and float(row["eval_acc_mean"]) == pytest.approx(0.91)

    val = report(tmp_path / "val")
    assert val.groups[0]["best_eval_acc_mean"] == pytest.approx(0.96)
    table, md_header, html_header = _headers(val, tmp_path / "val")
    assert table == md_header == html_header and "best val acc (%)" in table
    assert not [h for h in md_header + html_header + table if "test" in h]
    md = (tmp_path / "val" / "report.md").read_text()
    assert "| 2 | 2 | 0 | 91.00 ± 1.41 | 96.00 |" in md
    assert "best epoch on the validation split" in md and "**validation** split" in md
    assert "best epoch on the validation split" in (tmp_path / "val" / "report.html").read_text()
    assert "96.00" in val.format_table()
    assert float(read_csv(tmp_path / "val" / "report.csv")[0]["best_eval_acc_mean"]) == pytest.approx(0.96)

    # runs that mix the splits: some of them would be selecting on the test set
    make_run(tmp_path / "mixed", "t", acc=0.9, best=0.95, loss=0.5, eval_split="test")
    make_run(tmp_path / "mixed", "v", acc=0.9, best=0.95, loss=0.5, eval_split="val", val_split=0.1)
    mixed = report(tmp_path / "mixed", group_by=[])
    assert mixed.eval_split == "test, val" and mixed.groups[0]["best_eval_acc_mean"] is None
    for headers in _headers(mixed, tmp_path / "mixed"):
        assert not [h for h in headers if "best" in h] and "eval acc (%)" in headers, headers
    warning = read_page(tmp_path / "mixed" / "report.html")
    assert any(p.startswith("Warning: the runs evaluate on different splits (test, val)") for p in warning.paragraphs)
    assert read_csv(tmp_path / "mixed" / "report.csv")[0]["best_eval_acc_mean"] == ""


def test_plots_are_pngs_of_sensible_size(init_sweep):
    report(init_sweep)
    for name in ("train_loss.png", "eval_acc.png"):
        path = init_sweep / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = mpimg.imread(path)
        h, w = image.shape[:2]
        assert 500 <= w <= 2500 and 400 <= h <= 1200
        assert image[..., :3].std() > 0.05  # drawn on, not blank
    assert not list(init_sweep.glob(".*"))  # no temp files left behind by the atomic writes


@pytest.mark.slow
def test_many_groups_give_wider_figures(tmp_path):
    for i, init in enumerate(["zeros", "ones", "uniform", "normal", "xavier_uniform", "xavier_normal",
                              "kaiming_uniform", "kaiming_normal", "orthogonal", "default"]):
        make_run(tmp_path, f"{i:02d}-{init}", init=init, acc=0.1 + 0.08 * i, loss=2.0 / (i + 1))
    report(tmp_path)
    few = tmp_path / "few"
    make_run(few, "a", init="zeros", acc=0.1, loss=2.3)
    make_run(few, "b", init="ones", acc=0.1, loss=2.3)
    report(few)
    for name in ("train_loss.png", "eval_acc.png"):
        assert mpimg.imread(tmp_path / name).shape[1] > mpimg.imread(few / name).shape[1]


def test_html_is_self_contained_and_runs_no_script(init_sweep):
    report(init_sweep)
    text = (init_sweep / "report.html").read_text()
    page = Page(text)
    assert page.scripts == 0 and "<script" not in text.lower()
    assert not re.search(r"<[^>]*\son\w+=", text)  # no event handlers either: the page is markup and CSS only
    assert len(page.figures) == 2 and all(f["src"].startswith("data:image/png;base64,") for f in page.figures)
    assert not re.search(r'(src|href)="(?!data:)', text)  # no external resources
    assert "<link" not in text and "@import" not in text and "url(" not in text
    assert any(str(init_sweep.resolve()) in p for p in page.paragraphs)  # where the numbers come from


def _same_report(page, md):
    """The page and report.md say the same: title, section headings, tables (headers and rows), figures."""
    lines = md.splitlines()
    assert page.title == lines[0].removeprefix("# ") and page.headings[0] == (1, page.title)
    headings = [(len(line) - len(line.lstrip("#")), line.lstrip("# ")) for line in lines[1:] if line.startswith("#")]
    assert [(level, re.sub("[`*]", "", text)) for level, text in page.headings[1:]] == \
        [(level, re.sub("[`*]", "", text)) for level, text in headings]
    assert [(t["headers"], t["rows"]) for t in page.tables] == markdown_tables(md)
    shown = re.findall(r"^!\[(.*)\]\((.*)\)$", md, re.MULTILINE)
    assert [f["alt"] for f in page.figures] == [alt for alt, _ in shown]
    return [name for _, name in shown]


@pytest.mark.slow
def test_the_page_shows_every_table_and_every_figure(init_sweep):
    (init_sweep / "measurements.json").write_text(json.dumps(MEASUREMENTS))
    result = report(init_sweep)
    page = read_page(init_sweep / "report.html")
    names = _same_report(page, (init_sweep / "report.md").read_text())
    assert names == ["train_loss.png", "eval_acc.png"]

    summary = page.table("summary")
    assert summary["section"] == "results"
    assert summary["headers"] == ["init", "n", "completed", "diverged", "test acc (%)", "final train loss",
                                  "wall time (s)"]
    assert summary["rows"] == [["kaiming_normal", "3", "3", "0", "97.15 ± 0.34", "0.1033 ± 0.0153", "21.0"],
                               ["zeros", "3", "2", "1", "43.00 ± 4.24", "1.4500 ± 0.0707", "12.0"]]
    assert summary["rows"] == [[c.strip() for c in re.split(r"\s{2,}", line.strip())]
                               for line in result.format_table().splitlines()[2:]]  # the terminal's table too
    step_time = next(t for t in page.tables if t["section"] == "measurements")
    assert step_time["headers"] == ["norm", "ms / step", "peak | MiB"]
    assert step_time["rows"] == [["bn", "12.35", "100"], ["gn <b>", "15", "-"]]  # text, never markup

    for figure, name in zip(page.figures, names, strict=True):
        assert figure["alt"] and figure["caption"]
        data = base64.b64decode(figure["src"].removeprefix("data:image/png;base64,"), validate=True)
        assert data == (init_sweep / name).read_bytes()
        pixels = png_pixels(data)
        h, w = pixels.shape[:2]
        assert 500 <= w <= 2500 and 400 <= h <= 1200
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20  # drawn on in many colours, not blank
        assert (pixels.min(axis=2) < 0.5).mean() > 0.005  # dark ink: axes, labels, text


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.slow
def test_a_browser_reads_the_same_tables_and_figures(init_sweep, tmp_path):
    binary = _chromium()
    if binary is None:
        pytest.skip("chromium is not installed")
    report(init_sweep)
    profile = tmp_path / "chromium-profile"
    cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--dump-dom", (init_sweep / "report.html").resolve().as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(tmp_path)},
                          check=False)
    dom, page = Page(done.stdout), read_page(init_sweep / "report.html")
    assert dom.tables == page.tables and [t["id"] for t in dom.tables] == ["summary"]  # nothing lost to bad markup
    assert dom.figures == page.figures and dom.headings == page.headings and dom.paragraphs == page.paragraphs


def test_a_run_whose_config_cannot_be_read_is_skipped_with_a_warning(init_sweep, caplog):
    (init_sweep / "broken").mkdir()
    (init_sweep / "broken" / "config.yaml").write_text("model: [unclosed\n")
    (init_sweep / "foreign").mkdir()
    (init_sweep / "foreign" / "config.yaml").write_text("model: resnet50\ncolour: red\n")  # no reslab config
    with caplog.at_level(logging.WARNING, logger="reslab.reporting"):
        result = report(init_sweep)
    assert f"skipping {init_sweep / 'broken'}: unreadable config.yaml" in caplog.text
    assert f"skipping {init_sweep / 'foreign'}: unreadable config.yaml" in caplog.text
    assert len(result.runs) == 6 and [g["n"] for g in result.groups] == [3, 3]  # the others, as before


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "is not a directory"),
    (lambda d: d.mkdir(), "no runs in"),
    (lambda d: make_run(d, "r", acc=0.5, loss=1.0, summary=False), "has finished"),
])
def test_missing_or_empty_directory_is_one_line_spec_error(tmp_path, setup, message):
    target = tmp_path / "runs"
    setup(target)
    with pytest.raises(SpecError) as info:
        report(target)
    text = str(info.value)
    assert message in text and str(target) in text and "\n" not in text


def test_unknown_group_by_lists_valid_fields(init_sweep):
    with pytest.raises(SpecError) as info:
        report(init_sweep, group_by="inti")
    text = str(info.value)
    assert "'inti'" in text and "valid fields:" in text and "init" in text and "batch_size" in text
    assert "\n" not in text
    assert not (init_sweep / "report.csv").exists()  # bad input writes nothing


def _python(script, *args, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow  # a fresh interpreter: torch and matplotlib imported anew
def test_plotting_leaves_the_matplotlib_backend_and_pyplot_alone(tmp_path):
    # A process (a notebook, a GUI) that chose its own backend keeps it after reslab draws:
    # svg stands in for any backend that is not Agg and needs no display.
    done = _python("""
        import sys
        import matplotlib
        from torch import nn
        from reslab.diagnose import signal_propagation
        from reslab.inits import init_weights
        from reslab.plots import plot_init_report, plot_mean_bars, plot_mean_curves, plot_signal
        out = sys.argv[1]
        plot_mean_bars(["a", "b"], [50.0, None], [2.0, None], f"{out}/bars.png", title="t", xlabel="x",
                       ylabel="y", ylim=(0.0, 100.0))
        plot_mean_curves([{"label": "a", "x": [1, 2], "mean": [1.0, 0.5], "std": [0.1, float("nan")]}],
                         f"{out}/curves.png", title="t", xlabel="x", ylabel="y")
        plot_init_report(init_weights(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), "kaiming_normal"),
                         f"{out}/init.png")
        plot_signal(signal_propagation("mlp", "none", "kaiming_normal", batch_size=4), f"{out}/signal.png",
                    title="t")
        print("pyplot imported" if "matplotlib.pyplot" in sys.modules else "no pyplot")
        print("backend", matplotlib.get_backend())
    """, tmp_path, env={"MPLBACKEND": "svg"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["no pyplot", "backend svg"]
    for name in ("bars", "curves", "init", "signal"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow  # a fresh interpreter: torch and matplotlib imported anew
def test_cli_logging_configures_only_the_reslab_logger(init_sweep):
    # Runs in a fresh interpreter: under pytest the root logger already has handlers,
    # which hides what logging.basicConfig would do to a real process.
    done = _python("""
        import dataclasses, json, logging, os, sys
        from reslab import cli

        root = logging.getLogger()
        before = (root.level, len(root.handlers))
        during = []
        original = cli.COMMANDS["report"]

        def run(args):  # the command, plus a message from a third-party library and a reslab debug message
            during.append(root.level)
            logging.getLogger("matplotlib").info("third-party info")
            logging.getLogger("reslab.probe").debug("reslab debug")
            return original.run(args)

        cli.COMMANDS["report"] = dataclasses.replace(original, run=run)
        codes = [cli.main(["report", sys.argv[1]]), cli.main(["report", sys.argv[1]]),
                 cli.main(["-v", "report", sys.argv[1]])]
        os.environ["RANK"] = "1"  # a torchrun rank other than 0: warnings only
        codes.append(cli.main(["report", sys.argv[1]]))
        logging.getLogger("matplotlib").info("third-party info after")
        print(json.dumps({"codes": codes, "before": before, "during": during,
                          "after": (root.level, len(root.handlers)),
                          "reslab_handlers": len(logging.getLogger("reslab").handlers)}))
    """, init_sweep)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout.splitlines()[-1])
    assert state["codes"] == [0, 0, 0, 0]
    assert state["before"] == state["after"] == [logging.WARNING, 0]  # root logger: level and handlers as found
    assert state["during"] == [logging.WARNING] * 4
    assert state["reslab_handlers"] == 0  # nothing left behind, so nothing stacks
    err = done.stderr
    assert "third-party" not in err
    # reslab's own INFO message, once per rank-0 call (a stacked handler would print it 1 + 2 + 3 times)
    assert err.count("1 of 7 runs have not finished") == 3
    assert err.count("reslab debug") == 1  # -v only
    assert "1 of 7 runs have not finished (no summary.json) and are left out\n" in err  # "%(message)s" only


MEASUREMENTS = [
    {"title": "Step time", "text": "Milliseconds a training step takes, batch 128, on 2 CPU cores.",
     "headers": ["norm", "ms / step", "peak | MiB"], "rows": [["bn", 12.34567, 100], ["gn <b>", 15.0, None]]},
    {"title": "A note", "text": "Only words here.", "headers": [], "rows": []},
]


def test_measurements_json_becomes_its_own_section(init_sweep):
    (init_sweep / "measurements.json").write_text(json.dumps(MEASUREMENTS))
    result = report(init_sweep)
    assert [m["title"] for m in result.measurements] == ["Step time", "A note"]
    md = (init_sweep / "report.md").read_text()
    lines = md.splitlines()
    assert md.index("## Measurements") < md.index("### Step time") < md.index("## Setup") < md.index("| init")
    assert "Milliseconds a training step takes, batch 128, on 2 CPU cores." in lines
    # format_table's conventions: 4 significant figures, None as '-', numeric columns right-aligned
    assert lines[lines.index("| norm | ms / step | peak \\| MiB |") + 1:][:3] == [
        "| --- | ---: | ---: |", "| bn | 12.35 | 100 |", "| gn <b> | 15 | - |"]
    assert "### A note" in lines and "Only words here." in lines

    page = read_page(init_sweep / "report.html")
    assert page.sections.index("measurements") < page.sections.index("setup")
    assert (2, "Measurements") in page.headings and (3, "Step time") in page.headings
    measured = next(t for t in page.tables if t["section"] == "measurements")
    assert measured["headers"] == ["norm", "ms / step", "peak | MiB"]
    assert measured["rows"] == [["bn", "12.35", "100"], ["gn <b>", "15", "-"]]  # escaped, not markup
    assert "Milliseconds a training step takes, batch 128, on 2 CPU cores." in page.paragraphs
    text = (init_sweep / "report.html").read_text()
    assert "<td class=num>12.35</td>" in text and "<td>gn &lt;b&gt;</td>" in text  # numbers align right
    # the summary table keeps its own headers
    table, md_header, html_header = _headers(result, init_sweep)
    assert html_header == md_header == ["init", "n", "completed", "diverged", "test acc (%)", "final train loss",
                                        "wall time (s)"]


@pytest.mark.parametrize("content", [
    b"{not json",
    b"\xff\xfe\x00",  # not text
    json.dumps({"title": "x"}).encode(),  # not a list
    json.dumps([{"title": "t", "text": "x", "headers": ["a", "b"], "rows": [[1]]}]).encode(),  # a short row
    json.dumps([{"title": "t", "text": "x", "headers": ["a"], "rows": [[{"v": 1}]]}]).encode(),  # a mapping cell
    json.dumps([{"text": "x", "headers": [], "rows": []}]).encode(),  # no title
])
def test_a_malformed_measurements_json_is_a_warning_and_left_out(init_sweep, caplog, content):
    (init_sweep / "measurements.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="reslab.reporting"):
        result = report(init_sweep)
    assert "measurements.json left out of the report" in caplog.text
    assert result.measurements == []
    assert "Measurements" not in (init_sweep / "report.md").read_text()
    assert "measurements" not in read_page(init_sweep / "report.html").sections
    assert (init_sweep / "report.csv").is_file()


def _texts(fig):
    """Every piece of text the figure draws."""
    ax = fig.axes[0]
    texts = [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts,
             *fig.texts]
    return [t for t in texts if t.get_visible() and t.get_text()]


def _inside(inner, outer, tol=0.5):
    return (inner.x0 >= outer.x0 - tol and inner.x1 <= outer.x1 + tol and inner.y0 >= outer.y0 - tol
            and inner.y1 <= outer.y1 + tol)


def _check_bar_chart(fig, low=0.0, high=100.0):
    from matplotlib.container import ErrorbarContainer

    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert bars
    for container in bars:
        _, caps, columns = container.lines
        segments = [seg for col in columns for seg in col.get_segments()]
        assert segments
        for seg in segments:
            assert all(low <= y <= high for y in np.asarray(seg)[:, 1]), seg
        for cap in caps:
            assert all(low <= y <= high for y in cap.get_ydata()), cap.get_ydata()
    for patch in ax.patches:  # the bars themselves
        assert low <= patch.get_y() and patch.get_y() + patch.get_height() <= high
    renderer = fig.canvas.get_renderer()
    axes_box = ax.get_window_extent(renderer)
    for t in _texts(fig):
        assert _inside(t.get_window_extent(renderer), fig.bbox), t.get_text()
    for t in ax.texts:  # value labels and notes: inside the axes, none above its top
        assert _inside(t.get_window_extent(renderer), axes_box), t.get_text()


def test_accuracy_bars_keep_error_bars_and_labels_inside(tmp_path):
    from reslab.plots import draw_mean_bars, save_figure

    fig = draw_mean_bars(["kaiming_normal", "zeros", "ones"], [99.5, 1.0, None], [3.0, 5.0, None],
                         title="Final test accuracy (mean ± std over completed runs)", xlabel="init",
                         ylabel="test accuracy (%)", notes=["1 diverged, 2 failed", "", "3 failed"],
                         ylim=(0.0, 100.0))
    _check_bar_chart(fig)
    ax = fig.axes[0]
    assert max(ax.get_yticks()) == 100  # headroom for the labels, no tick above 100%
    assert "99.5\n±3.0" in ax.texts[0].get_text()  # the label keeps the real spread; only the drawing is clipped
    save_figure(fig, tmp_path / "bars.png")  # the layout at save time is the one checked
    _check_bar_chart(fig)


def _corners(t, renderer):
    """The four display corners of a (possibly turned) text: its level box turned about its anchor."""
    angle = t.get_rotation()
    t.set_rotation(0)
    box = t.get_window_extent(renderer)
    t.set_rotation(angle)
    ax0, ay0 = t.get_transform().transform(t.get_position())
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    points = np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]]) - [ax0, ay0]
    return points @ np.array([[c, s], [-s, c]]) + [ax0, ay0]


def _overlap(p, q):
    """Whether two convex quadrilaterals overlap (separating axis test)."""
    for poly in (p, q):
        for i in range(4):
            edge = poly[(i + 1) % 4] - poly[i]
            normal = np.array([-edge[1], edge[0]])
            a, b = p @ normal, q @ normal
            if a.max() <= b.min() + 1e-6 or b.max() <= a.min() + 1e-6:
                return False
    return True


@pytest.mark.parametrize("n", [3, 12])
def test_long_group_names_turn_or_wrap_without_overlapping(tmp_path, n):
    from reslab.plots import draw_mean_bars

    labels = [f"kaiming_normal:mode=fan_out, {2 ** i}, gn:cpg=16" for i in range(n)]
    fig = draw_mean_bars(labels, [50.0] * n, [2.0] * n, title="t", xlabel="init, batch_size, norm", ylabel="acc",
                         notes=["1 diverged"] * n, ylim=(0.0, 100.0))
    _check_bar_chart(fig)
    renderer = fig.canvas.get_renderer()
    ticks = fig.axes[0].get_xticklabels()
    assert all(t.get_rotation_mode() == "anchor" or t.get_rotation() == 0 for t in ticks)
    quads = [_corners(t, renderer) for t in ticks]
    for a, b in zip(quads, quads[1:], strict=False):
        assert not _overlap(a, b)
    assert fig.get_size_inches()[1] * fig.dpi <= 1200
