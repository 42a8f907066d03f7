"""reslab report on a study directory: the study named in the heading, its source numbers beside the measured ones."""

import csv
import dataclasses
import logging
import re

import pytest

from reslab import reporting
from reslab.reporting import report
from reslab.studies import Study, write_study

from test_report import make_run

# Wu & He 2018, Table 3 style numbers: on ImageNet, not on what these runs train on
REFERENCE = {
    "source": "Wu & He 2018, Table 3",
    "dataset": "ImageNet",
    "metric": "final_eval_acc",
    "groups": [
        {"where": {"norm": "bn", "batch_size": "32"}, "value": 0.764},  # text "32" selects batch_size 32
        {"where": {"norm": "gn", "batch_size": 32}, "value": [0.852, 0.858]},
        {"where": {"norm": "ln"}, "value": 0.5},  # no such group here: shown nowhere
    ],
}


def _study(**extra):
    return Study(name="norms-tiny", claim="GN matches BN at batch 32", base={"model": "simple_cnn"},
                 grid={"norm": ["bn", "gn"], "batch_size": [32, 2]},
                 checks=('mean(norm="gn", batch_size=32) >= 0.5',), seeds=(0, 1), **extra)


def with_reference(study, reference):
    """``study`` carrying ``reference``, whether or not Study declares the attribute itself."""
    if "reference" in {f.name for f in dataclasses.fields(study)}:
        return dataclasses.replace(study, reference=reference)
    object.__setattr__(study, "reference", reference)  # a plain attribute on the frozen dataclass
    return study


@pytest.fixture
def study_dir(tmp_path):
    root = tmp_path / "study"
    for norm, accs in (("bn", {32: 0.90, 2: 0.60}), ("gn", {32: 0.88, 2: 0.87})):
        for bs, acc in accs.items():
            for seed in (0, 1):
                make_run(root, f"{norm}-bs{bs}-seed{seed}", norm=norm, batch_size=bs, seed=seed,
                         acc=acc + 0.01 * seed, loss=0.3, model="simple_cnn")
    write_study(_study(), root)
    return root


def _use_reference(monkeypatch, reference):
    original = reporting.read_study
    monkeypatch.setattr(reporting, "read_study",
                        lambda root: (lambda s: s if s is None else with_reference(s, reference))(original(root)))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_study_directory_is_named_by_its_study(study_dir, tmp_path):
    result = report(study_dir)
    assert result.study == "norms-tiny" and result.reference is None
    md = (study_dir / "report.md").read_text().splitlines()
    assert md[0] == "# reslab report: study norms-tiny"
    assert md[2] == f"Directory: `{study_dir}`"
    page = (study_dir / "report.html").read_text()
    assert "<title>reslab report: study norms-tiny</title>" in page
    assert "<h1>reslab report: study norms-tiny</h1>" in page and str(study_dir) in page
    # no reference, no source column anywhere
    assert "source" not in md[md.index(next(line for line in md if line.startswith("| norm")))]
    assert "reference" not in (study_dir / "report.csv").read_text().splitlines()[0]
    assert "source" not in result.format_table()

    for seed in (0, 1):  # a plain sweep keeps the directory as its name
        make_run(tmp_path / "sweep", f"s{seed}", seed=seed, acc=0.5, loss=1.0)
    plain = report(tmp_path / "sweep")
    assert plain.study is None
    assert (tmp_path / "sweep" / "report.md").read_text().startswith(f"# reslab report: {tmp_path / 'sweep'}\n")
    page = (tmp_path / "sweep" / "report.html").read_text()
    assert f"<title>reslab report: {tmp_path / 'sweep'}</title>" in page and "<h1>reslab report</h1>" in page


def test_source_numbers_sit_beside_the_measured_ones(study_dir, monkeypatch, caplog):
    _use_reference(monkeypatch, REFERENCE)
    with caplog.at_level(logging.INFO, logger="reslab.reporting"):
        result = report(study_dir)
    assert "no group of these runs matches {'norm': 'ln'}" in caplog.text
    assert [(g["norm"], g["batch_size"], g["reference"]) for g in result.groups] == [
        ("bn", 2, None), ("bn", 32, 0.764), ("gn", 2, None), ("gn", 32, (0.852, 0.858))]

    md = (study_dir / "report.md").read_text()
    lines = md.splitlines()
    assert "| norm | batch_size | n | completed | diverged | test acc (%) | source % | final train loss |" \
        " wall time (s) |" in lines
    assert "| bn | 32 | 2 | 2 | 0 | 90.50 ± 0.71 | 76.4 | 0.3000 ± 0.0000 | 10.0 |" in lines
    assert "| gn | 32 | 2 | 2 | 0 | 88.50 ± 0.71 | 85.2-85.8 | 0.3000 ± 0.0000 | 10.0 |" in lines
    assert "| bn | 2 | 2 | 2 | 0 | 60.50 ± 0.71 |  | 0.3000 ± 0.0000 | 10.0 |" in lines
    sentence = ("Source numbers: Wu & He 2018, Table 3, on ImageNet - a different dataset from these runs' "
                "mnist5k")
    assert sentence in md

    page = (study_dir / "report.html").read_text()
    headers = re.findall(r'<th scope="col">(.*?)</th>', page)
    assert headers[headers.index("test acc (%)") + 1] == "source %"
    assert "<td class=num>85.2-85.8</td>" in page and "<td class=num>76.4</td>" in page
    assert "Source numbers: Wu &amp; He 2018, Table 3, on ImageNet - a different dataset" in page

    table = result.format_table().splitlines()
    assert "source %" in table[0] and "85.2-85.8" in table[-1] and "76.4" in table[-3]

    rows = read_csv(study_dir / "report.csv")
    assert list(rows[0])[-1] == "reference"
    assert [r["reference"] for r in rows] == ["", "0.764", "", "0.852-0.858"]


def test_same_dataset_and_bad_entries(study_dir, monkeypatch, caplog):
    reference = {**REFERENCE, "dataset": "MNIST5k",
                 "groups": [{"where": {"norm": "gn", "batch_size": 2}, "value": "high"},  # not a number
                            {"where": {"norm": "gn", "batch_size": 2}, "value": 0.9}]}
    _use_reference(monkeypatch, reference)
    with caplog.at_level(logging.WARNING, logger="reslab.reporting"):
        result = report(study_dir)
    assert "left out" in caplog.text and "'high'" in caplog.text
    assert [g["reference"] for g in result.groups] == [None, None, 0.9, None]
    md = (study_dir / "report.md").read_text()
    assert "Source numbers: Wu & He 2018, Table 3, on MNIST5k, the dataset of these runs." in md
    assert "a different dataset" not in md

    _use_reference(monkeypatch, "Wu & He 2018")  # not a mapping: no column, a warning, the report still writes
    result = report(study_dir)
    assert result.reference is None and "source %" not in (study_dir / "report.md").read_text()


def test_a_percentage_given_for_a_fraction_is_flagged(study_dir, monkeypatch, caplog):
    _use_reference(monkeypatch, {**REFERENCE, "groups": [{"where": {"norm": "gn", "batch_size": 32}, "value": 85.2}]})
    with caplog.at_level(logging.WARNING, logger="reslab.reporting"):
        report(study_dir)
    assert "reference accuracies are fractions" in caplog.text
