"""The README's "Your own model and data" example, run as written: its model file, its study file and its
shell commands, in a fresh directory, offline."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def example_blocks() -> dict[str, str]:
    """``<!-- example: NAME -->`` followed by a fenced block: NAME -> the block's text."""
    found = re.findall(r"<!-- example: (\S+) -->\n```\w*\n(.*?)```", README.read_text(), flags=re.S)
    return dict(found)


def test_the_readme_example_has_its_three_parts():
    blocks = example_blocks()
    assert set(blocks) == {"nets.py", "my_claim.yaml", "shell"}
    assert "residual_branch" in blocks["nets.py"] and "nets.py:SmallNet" in blocks["my_claim.yaml"]
    assert "folder:data/digits" in blocks["shell"] and "reslab study my_claim.yaml" in blocks["shell"]


@pytest.mark.slow
def test_the_readme_example_runs_offline_and_its_claim_is_supported(tmp_path):
    blocks = example_blocks()
    for name in ("nets.py", "my_claim.yaml"):
        (tmp_path / name).write_text(blocks[name])
    reslab_bin = shutil.which("reslab") or str(Path(sys.executable).parent / "reslab")
    env = {**os.environ, "RESLAB_CACHE": str(tmp_path / "cache"), "RESLAB_DATA": str(tmp_path / "data-home"),
           "PATH": f"{Path(reslab_bin).parent}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHON": sys.executable}
    script = blocks["shell"].replace("python -", f"{sys.executable} -", 1)
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # the folder is the digits, 1,437 / 360, in ten class folders
    assert sorted(p.name for p in (tmp_path / "data/digits/train").iterdir()) == [str(d) for d in range(10)]
    run = tmp_path / "runs/mine"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_eval_acc"] > 0.5  # chance is 0.1
    assert json.loads((run / "classes.json").read_text()) == [str(d) for d in range(10)]
    assert f"acc {summary['final_eval_acc']:.4f}" in done.stdout  # reslab eval reproduces the run's number
    verdict = json.loads((tmp_path / "studies/mine/verdict.json").read_text())
    assert verdict["verdict"] == "supported", verdict
    assert "Classes (10)" in (tmp_path / "studies/mine/report.md").read_text()
    assert not list((tmp_path / "data").rglob("*.pt"))  # nothing cached inside the image folder
