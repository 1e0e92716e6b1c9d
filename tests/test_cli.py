"""The `headct` command line as a user meets it: instant help, exit code 2 on bad config, config show."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner


def test_help_is_instant_and_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "import cli\n"
        "result = CliRunner().invoke(cli.app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "for job in ('synth', 'ingest', 'split', 'pretrain', 'probe', 'report', 'config'):\n"
        "    assert job in result.output, job\n"
        "heavy = [m for m in ('torch', 'monai', 'mlflow', 'pandas', 'matplotlib') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "HEAVY=\n" in out.stdout, out.stdout + out.stderr


def test_version_is_printed() -> None:
    import cli
    from headct import __version__

    result = CliRunner().invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output == f"headct {__version__}\n"


def test_installed_console_script_answers_help() -> None:
    exe = Path(sys.executable).parent / "headct"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "pretrain" in out.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["pretrain", "--set", "pretrain.lrr=1"], "did you mean 'lr'"),
        (["probe", "--set", "probe.bootstrap=1"], "greater than or equal to 10"),
        (["ingest", "--set", "ingest.patient_key=name"], "'dicom' or 'cq500_folder'"),
        (["config", "show", "nosuch"], "unknown section"),
    ],
)
def test_bad_configuration_exits_2_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], fragment: str
) -> None:
    import cli

    (tmp_path / "params.yaml").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, [*args, "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "mlflow.db").exists()  # nothing started


def test_config_show_prints_resolved_values(tmp_path: Path) -> None:
    import cli

    params = tmp_path / "params.yaml"
    params.write_text("pretrain:\n  lr: 0.002\n")
    result = CliRunner().invoke(
        cli.app, ["config", "show", "pretrain", "--params", str(params), "--set", "pretrain.batch_size=3"]
    )
    assert result.exit_code == 0, result.output
    body = yaml.safe_load("\n".join(line for line in result.output.splitlines() if not line.startswith("#")))
    assert body["pretrain"]["lr"] == 0.002
    assert body["pretrain"]["batch_size"] == 3
    assert body["pretrain"]["mask_ratio"] == 0.75  # defaults filled in


def test_adhoc_ingest_of_any_folder_and_a_missing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`headct ingest SRC DEST` on an arbitrary export: DICOM PatientID as patient key, no labels file needed."""
    import cli
    from tests.dicom_factory import SeriesSpec, write_series

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(
        f"tracking:\n  uri: sqlite:///{tmp_path}/mlflow.db\ningest:\n  preprocess:\n    shape: [32, 32, 32]\n"
        "    spacing_mm: 6.0\n  workers: 1\n"
    )
    export = tmp_path / "export"
    write_series(export / "a" / "b", SeriesSpec(), patient_id="PID-ADHOC-0001")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", "a-test-key-of-at-least-16-bytes")
    runner = CliRunner()
    result = runner.invoke(cli.app, ["ingest", str(export), "store"])
    assert result.exit_code == 0, result.output
    # Every job ends by saying where its outputs went and which MLflow run holds it.
    assert "headct ingest: outputs in store, reports/ingest\n" in result.output
    import re

    import mlflow

    run_id = re.search(r"headct ingest: MLflow run ([0-9a-f]{32}) \('ingest store'", result.output)
    assert run_id, result.output
    assert mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id[1]).data.tags["headct.job"] == "ingest"
    import pandas as pd

    manifest = pd.read_parquet(project / "store" / "manifest.parquet")  # DEST relative to where the user stands
    assert len(manifest) == 1 and manifest["patient_key_source"].iloc[0] == "dicom"
    assert manifest["patient_id"].iloc[0].startswith("pat_")

    missing = runner.invoke(cli.app, ["ingest", str(tmp_path / "nowhere"), "store2"])
    assert missing.exit_code == 1
    assert "nowhere" in missing.output
    assert "Traceback" not in missing.output
