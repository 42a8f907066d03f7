"""reslab report on a study directory: the study named in the heading, its source numbers beside the measured ones."""

import csv
import logging

import pytest
import yaml

from reslab.errors import SpecError
from reslab.reporting import report
from reslab.studies import study_from_dict, write_study
from test_report import make_run, markdown_tables, read_page

# Wu & He 2018, Table 3 style numbers: on ImageNet, not on what these runs train on
REFERENCE = {
    "source": "Wu & He 2018, Table 3",
    "dataset": "ImageNet",
    "metric": "final_eval_acc",
    "groups": [
        {"norm": "bn", "batch_size": "32", "value": 0.764},  # text "32" selects batch_size 32
        {"norm": "gn", "batch_size": 32, "value": [0.858, 0.852]},  # a range, in either order
        {"norm": "ln", "value": 0.5},  # a group of the study no run here has: shown nowhere
    ],
}


def _study(reference=None):
    """The study of these runs, validated as a study file is; its grid has a group (ln) the runs leave out."""
    data = {"name": "norms-tiny", "claim": "GN matches BN at batch 32", "base": {"model": "simple_cnn"},
            "grid": {"norm": ["bn", "gn", "ln"], "batch_size": [32, 2]}, "seeds": [0, 1],
            "verdict": {"checks": ['mean(norm="gn", batch_size=32) >= 0.5']}}
    return study_from_dict({**data, **({"reference": reference} if reference is not None else {})}, "test")


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


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_study_directory_is_named_by_its_study(study_dir, tmp_path):
    result = report(study_dir)
    assert result.study == "norms-tiny" and result.reference is None
    md = (study_dir / "report.md").read_text().splitlines()
    assert md[0] == "# reslab report: study norms-tiny"
    assert md[2] == f"Directory: `{study_dir}`"
    page = read_page(study_dir / "report.html")
    assert page.title == "reslab report: study norms-tiny" and page.headings[0] == (1, page.title)
    assert f"Directory: {study_dir}" in page.paragraphs
    # the verdict and its checks, the same on the page as in report.md
    assert page.sections[0] == "verdict" and (2, "Verdict") in page.headings
    checks = page.table("checks")
    assert checks["section"] == "verdict" and checks["rows"][0][:2] == ['mean(norm="gn", batch_size=32) >= 0.5',
                                                                         "holds"]
    assert [(t["headers"], t["rows"]) for t in page.tables] == markdown_tables("\n".join(md))
    assert any(p.startswith("supported at 95% confidence: GN matches BN at batch 32") for p in page.paragraphs)
    # no reference, no source column anywhere
    assert "source %" not in page.table("summary")["headers"]
    assert "reference" not in (study_dir / "report.csv").read_text().splitlines()[0]
    assert "source" not in result.format_table()

    for seed in (0, 1):  # a plain sweep keeps the directory as its name
        make_run(tmp_path / "sweep", f"s{seed}", seed=seed, acc=0.5, loss=1.0)
    plain = report(tmp_path / "sweep")
    assert plain.study is None
    assert (tmp_path / "sweep" / "report.md").read_text().startswith(f"# reslab report: {tmp_path / 'sweep'}\n")
    page = read_page(tmp_path / "sweep" / "report.html")
    assert page.title == f"reslab report: {tmp_path / 'sweep'}" and page.headings[0] == (1, page.title)
    assert "verdict" not in page.sections and [t["id"] for t in page.tables] == ["summary"]


def test_source_numbers_sit_beside_the_measured_ones(study_dir, caplog):
    write_study(_study(REFERENCE), study_dir)
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

    page = read_page(study_dir / "report.html")
    summary = page.table("summary")
    assert summary["headers"][summary["headers"].index("test acc (%)") + 1] == "source %"
    assert [row[6] for row in summary["rows"]] == ["", "76.4", "", "85.2-85.8"]
    assert any(p.startswith(sentence) for p in page.paragraphs)

    table = result.format_table().splitlines()
    assert "source %" in table[0] and "85.2-85.8" in table[-1] and "76.4" in table[-3]

    rows = read_csv(study_dir / "report.csv")
    assert list(rows[0])[-1] == "reference"
    assert [r["reference"] for r in rows] == ["", "0.764", "", "0.852-0.858"]


def test_same_dataset_says_so(study_dir):
    reference = {**REFERENCE, "dataset": "MNIST5k", "groups": [{"norm": "gn", "batch_size": 2, "value": 0.9}]}
    write_study(_study(reference), study_dir)
    result = report(study_dir)
    assert [g["reference"] for g in result.groups] == [None, None, 0.9, None]
    md = (study_dir / "report.md").read_text()
    assert "Source numbers: Wu & He 2018, Table 3, on MNIST5k, the dataset of these runs." in md
    assert "a different dataset" not in md


@pytest.mark.parametrize("reference, message", [
    ("Wu & He 2018", "'reference' needs 'groups'"),  # not a mapping
    ({**REFERENCE, "groups": [{"norm": "gn", "batch_size": 2, "value": "high"}]}, "must be a number or [low, high]"),
    ({**REFERENCE, "groups": [{"norm": "gn", "batch_size": 2, "value": float("nan")}]}, "must be a number"),
])
def test_a_study_whose_reference_is_not_numbers_is_refused_before_any_report(study_dir, reference, message):
    # the numbers beside the measured ones must be the source's, never a guess at them
    with pytest.raises(SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _study(reference)
    study = _study().to_dict()
    (study_dir / "study.yaml").write_text(yaml.safe_dump({**study, "reference": reference}))
    with pytest.raises(SpecError, match="study.yaml"):
        report(study_dir)
    assert not (study_dir / "report.md").exists()


def test_a_percentage_given_for_a_fraction_is_flagged(caplog):
    with caplog.at_level(logging.WARNING, logger="reslab.studies"):
        _study({**REFERENCE, "groups": [{"norm": "gn", "batch_size": 32, "value": 85.2}]})
    assert "reference accuracies are fractions" in caplog.text
