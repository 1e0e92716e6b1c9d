"""dvc.yaml's code deps are derived from the imports (scripts/dvc_deps.py): each stage depends on exactly the
headct/ and pipelines/ files its job imports, and a stale dvc.yaml fails here naming the stage, file and fix."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import dvc_deps  # noqa: E402


def test_dvc_yaml_code_deps_match_the_imports() -> None:
    diffs = dvc_deps.compare(REPO, (REPO / "dvc.yaml").read_text())
    assert not diffs, dvc_deps.describe(diffs)


def test_each_stage_reads_only_its_own_config_modules() -> None:
    stages = dvc_deps.load_stages((REPO / "dvc.yaml").read_text(), "dvc.yaml")
    config = {s: {d for d in spec["deps"] if d.startswith("headct/config")} for s, spec in stages.items()}
    assert config["probe"] == {"headct/config/base.py", "headct/config/evaluate.py"}
    assert config["pretrain"] >= {"headct/config/base.py", "headct/config/pretrain.py"}
    assert config["split"] == {"headct/config/base.py", "headct/config/data.py"}
    for stage, deps in config.items():  # the loader and Params (every section) belong to cli.py, no job
        assert not deps & {"headct/config", "headct/config/__init__.py", "headct/config/params.py",
                           "headct/config/loader.py"}, stage


def _stale(text: str) -> str:
    """The committed dvc.yaml with probe's own module dropped, an unused file added to split, and synth
    depending on the whole config folder."""
    probe = text.index("\n  probe:\n")
    drop = text.index("      - pipelines/probe.py\n", probe)
    text = text[:drop] + text[drop + len("      - pipelines/probe.py\n"):]
    text = text.replace("      - pipelines/split.py\n", "      - pipelines/split.py\n      - headct/config/loader.py\n")
    return text.replace("      - headct/config/data.py\n      - headct/data/synth\n",
                        "      - headct/config\n      - headct/data/synth\n", 1)


def test_a_stale_dvc_yaml_is_named_with_the_fix() -> None:
    current = (REPO / "dvc.yaml").read_text()
    stale = _stale(current)
    assert stale != current
    diffs = dvc_deps.compare(REPO, stale)
    message = dvc_deps.describe(diffs)
    assert {d.stage for d in diffs} == {"probe", "split", "synth"}, message
    assert "stage probe: missing pipelines/probe.py" in message
    assert "stage split: extra headct/config/loader.py" in message
    assert "stage synth: extra headct/config/evaluate.py (in folder dep headct/config)" in message
    assert "fix: python scripts/dvc_deps.py --write" in message
    # The rewrite restores the committed text exactly: comments, data deps and their order untouched.
    assert dvc_deps.rewrite(REPO, stale, diffs) == current


def _copy_project(dest: Path) -> Path:
    for name in ("headct", "pipelines"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "cli.py", dest / "cli.py")
    return dest


def test_script_checks_and_writes_a_project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_project(tmp_path)
    current = (REPO / "dvc.yaml").read_text()
    (root / "dvc.yaml").write_text(_stale(current))
    assert dvc_deps.main(["--root", str(root)]) == 1
    assert "stage probe: missing pipelines/probe.py" in capsys.readouterr().out
    assert dvc_deps.main(["--root", str(root), "--write"]) == 0
    assert (root / "dvc.yaml").read_text() == current
    assert dvc_deps.main(["--root", str(root)]) == 0
    # A new import in a job is a new dep of exactly the stages that run it.
    job = root / "pipelines" / "split.py"
    job.write_text(job.read_text() + "\n\ndef _extra():\n    from headct.data import augment  # noqa: F401\n")
    diffs = dvc_deps.compare(root, (root / "dvc.yaml").read_text())
    assert [(d.stage, d.missing) for d in diffs] == [("split", ["headct/data/augment.py"])]


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_import_rules(tmp_path: Path) -> None:
    _write(tmp_path, {
        "cli.py": (
            "@app.command()\ndef go():\n    _run_job('go', None, None)\n\n"
            "@app.command('other-name')\ndef other():\n    _run_job('two', None, None)\n"
        ),
        "headct/__init__.py": "def __getattr__(name):\n    from headct import lazy\n    return lazy\n",
        "headct/lazy.py": "",
        "headct/pkg/__init__.py": "from headct.pkg.heavy import H\nNAME = 1\n",
        "headct/pkg/heavy.py": "H = 1\n",
        "headct/pkg/light.py": "from .rel import R\nfrom ..pkg import NAME\n",
        "headct/pkg/rel.py": "import numpy\nR = 1\n",
        "headct/unused.py": "",
        "pipelines/__init__.py": "",
        "pipelines/go.py": "from headct.pkg.light import R\n\ndef run():\n    from headct import lazy\n",
        "pipelines/two.py": "import headct\nfrom headct.pkg import light\n",
    })
    assert dvc_deps.command_jobs(tmp_path / "cli.py") == {"go": {"go"}, "other-name": {"two"}}

    def files(job: str) -> set[str]:
        return {p.relative_to(tmp_path).as_posix() for p in dvc_deps.closure(tmp_path, tmp_path / job)}

    # Submodule imports do not count the package __init__ (headct/pkg/__init__ would pull in heavy.py);
    # `from ..pkg import NAME` does; an import inside a function counts; third-party ones are ignored.
    assert files("pipelines/go.py") == {"pipelines/go.py", "headct/pkg/light.py", "headct/pkg/rel.py",
                                        "headct/pkg/__init__.py", "headct/pkg/heavy.py", "headct/lazy.py"}
    assert files("pipelines/two.py") == {"pipelines/two.py", "headct/__init__.py", "headct/lazy.py",
                                         "headct/pkg/light.py", "headct/pkg/rel.py", "headct/pkg/__init__.py",
                                         "headct/pkg/heavy.py"}
    assert dvc_deps.imported_files(tmp_path, tmp_path / "headct/pkg/rel.py") == set()


def test_unknown_command_names_the_stage(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    with pytest.raises(dvc_deps.DepsError, match="stage 'bogus'.*'headct nope' names no command of cli.py"):
        dvc_deps.compare(root, "stages:\n  bogus:\n    cmd: headct nope\n    deps:\n      - pipelines/x.py\n")
