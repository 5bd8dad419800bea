"""The README's promises: its two set-up commands, the CI script, the ops table, the main job."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from liftir.cli import main
from liftir.docs import END, START, ops_markdown

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    section = README.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2
    assert "liftir explain example:digits" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _setup_commands()[1] in ci


def test_ops_table_is_current():
    block = README.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == ops_markdown(), "run: python -m liftir.docs --write README.md"


def test_main_job_on_the_shipped_example(tmp_path, capsys):
    out = tmp_path / "attr.npz"
    code = main(["explain", "example:digits", "--input", "example:digits", "--target", "3",
                 "--out", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = np.load(out)
    x = np.load(ROOT / "liftir" / "data" / "digits.npy")
    assert saved["image"].shape == x.shape
    # summation-to-delta on the shipped model
    assert np.abs(saved["delta"]).max() < 1e-4


def test_papers_are_cited_so_that_a_clone_can_find_them():
    assert "../shared" not in README  # not part of a clone
    for arxiv in ("1605.01713", "1704.02685", "1412.6806"):
        assert f"arXiv:{arxiv}" in README
    assert "Striving for Simplicity: The All Convolutional Net" in README
    assert "Not Just a Black Box" in README


def test_readme_says_what_happens_to_non_finite_inputs():
    assert re.search(r"NaN or ±Inf are refused", README)


def test_readme_documents_the_cli_target_list_and_exit_codes():
    flat = " ".join(README.split())
    assert "`--target 1,2,3` explains classes 1, 2 and 3 **for every sample**" in flat
    assert "Exit codes, the same for every command" in flat
