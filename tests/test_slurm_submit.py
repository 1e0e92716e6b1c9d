"""`headct slurm ... --dry-run` and the templates in slurm/, without a cluster (the real one: tests/test_slurm.py)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headct.config import ConfigError, JobContext, load_params
from headct.errors import InputError
from pipelines import slurm
from tests.conftest import REPO

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))


def test_every_template_is_valid_bash_and_documents_each_variable_it_reads() -> None:
    assert {t.name for t in TEMPLATES} == {"ingest-array.sbatch", "ingest-merge.sbatch", "pretrain.sbatch",
                                           "tune-array.sbatch"}
    for template in TEMPLATES:
        subprocess.run(["bash", "-n", str(template)], check=True)
        text = template.read_text()
        head = text.split("set -euo pipefail", 1)[0]  # the comment block with the #SBATCH defaults
        read = set(re.findall(r"\$\{?(HEADCT_[A-Z_]+)", text))
        undocumented = [v for v in read if v not in head]
        assert not undocumented, f"{template.name}: {undocumented} not documented in its header"
        assert "#SBATCH --job-name=" in head and "#SBATCH --time=" in head


def _calls(root: Path, kind: str, *overrides: str) -> list[dict]:
    params, root = load_params(overrides=list(overrides), root=root)
    return slurm.commands(params.slurm, JobContext(root=root), kind, overrides=list(overrides),
                          ingest_dest=root / "data/store/site")


def test_ingest_is_an_array_of_shards_and_a_merge_that_waits_for_all_of_it(tmp_path: Path) -> None:
    array, merge = _calls(tmp_path, "ingest", "slurm.ingest.shards=6", "slurm.partition=cpu", "ingest.workers=2")
    assert "--array=1-6" in array["argv"] and "--partition=cpu" in array["argv"]
    assert array["argv"][-1] == "slurm/ingest-array.sbatch" and array["env"]["HEADCT_PROJECT"] == str(tmp_path)
    assert "--dependency=afterok:{previous}" in merge["argv"] and merge["argv"][-1] == "slurm/ingest-merge.sbatch"
    assert merge["env"]["HEADCT_DEST"] == str(tmp_path / "data/store/site")
    # --set reaches the jobs (but the slurm section's), so they run with the configuration that was submitted
    assert array["env"]["HEADCT_ARGS"] == merge["env"]["HEADCT_ARGS"] == "--set ingest.workers=2"


def test_pretrain_asks_for_nodes_gpus_and_the_preemption_warning(tmp_path: Path) -> None:
    (call,) = _calls(tmp_path, "pretrain", "slurm.pretrain.nodes=4", "slurm.exec_prefix=apptainer exec --nv a.sif")
    argv = call["argv"]
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=4", "--signal=USR1@360"} <= set(argv)
    assert call["env"]["HEADCT_NPROC_PER_NODE"] == "4"
    assert call["env"]["HEADCT_EXEC"] == "apptainer exec --nv a.sif"  # spaces travel in the environment
    (cpu,) = _calls(tmp_path, "pretrain", "slurm.pretrain.gpus_per_node=0")
    assert not any(a.startswith("--gpus") for a in cpu["argv"]) and cpu["env"]["HEADCT_NPROC_PER_NODE"] == "1"


def test_tune_shares_one_study_and_refuses_sqlite(tmp_path: Path) -> None:
    (call,) = _calls(tmp_path, "tune", "slurm.tune.tasks=8", "slurm.tune.storage=journal:/shared/t.journal")
    assert "--array=1-8" in call["argv"] and call["env"]["HEADCT_STORAGE"] == "journal:/shared/t.journal"
    with pytest.raises(ConfigError, match="SQLite is unsafe"):
        load_params(overrides=["slurm.tune.storage=sqlite:////nfs/optuna.db"], root=tmp_path)


def test_unknown_jobs_and_unsplittable_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown job 'train'"):
        _calls(tmp_path, "train")
    with pytest.raises(InputError, match="space"):
        _calls(tmp_path, "pretrain", "pretrain.register_as=my encoder")


def test_dry_run_prints_the_commands_and_submits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    (tmp_path / "params.yaml").write_text(f"slurm:\n  templates: {REPO / 'slurm'}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch: a dry run must not need one
    result = CliRunner().invoke(cli.app, ["slurm", "ingest", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "sbatch --parsable" in result.output and "'--dependency=afterok:<previous job id>'" in result.output
    assert not (tmp_path / "logs").exists()
    missing = CliRunner().invoke(cli.app, ["slurm", "tune", "--dry-run", "--set", "slurm.templates=nowhere"])
    assert missing.exit_code == 1 and "template not found" in missing.output
