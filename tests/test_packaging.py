"""Packaging metadata: `pip install` builds liftir without setuptools deprecation warnings."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BUILD_METADATA = """
import sys, tempfile, warnings
warnings.simplefilter("always")
from setuptools import build_meta
with tempfile.TemporaryDirectory() as out:
    build_meta.prepare_metadata_for_build_wheel(out)
"""


def test_license_is_an_spdx_expression():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # a table draws setuptools deprecations
    requires = project["build-system"]["requires"]
    setuptools = [r.replace(" ", "") for r in requires if r.startswith("setuptools")]
    assert setuptools and int(setuptools[0].split(">=")[1].split(".")[0]) >= 77  # SPDX support


def test_metadata_build_has_no_deprecation_warning(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings")
    proc = subprocess.run([sys.executable, "-c", BUILD_METADATA], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Deprecat" not in proc.stdout + proc.stderr, proc.stderr[-2000:]
