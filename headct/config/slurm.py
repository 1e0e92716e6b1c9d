"""The `slurm` section: what `headct slurm ingest|pretrain|tune` submits the templates in slurm/ with.

Every value here becomes an sbatch option or one of the templates' HEADCT_* variables; the templates document
the same defaults for submitting them by hand. Paths are relative to the project root.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from headct.config.base import Section

# sbatch's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME = r"^(\d+|\d+:\d{2}|\d+:\d{2}:\d{2}|\d+-\d+|\d+-\d+:\d{2}|\d+-\d+:\d{2}:\d{2})$"
_MEM = r"^\d+[KMGT]?$"  # sbatch --mem: 0 = all of the node's memory


class SlurmJob(Section):
    """Resources of one kind of job (sbatch options)."""

    cpus_per_task: int = Field(8, ge=1)
    mem: str = Field("32G", pattern=_MEM)
    time: str = Field("04:00:00", pattern=_TIME)


class SlurmIngest(SlurmJob):
    shards: int = Field(8, ge=1)  # array tasks: `--shard K/N` for K = 1..shards
    merge_cpus: int = Field(2, ge=1)
    merge_mem: str = Field("8G", pattern=_MEM)
    merge_time: str = Field("01:00:00", pattern=_TIME)


class SlurmPretrain(SlurmJob):
    cpus_per_task: int = Field(16, ge=1)
    mem: str = Field("0", pattern=_MEM)
    time: str = Field("48:00:00", pattern=_TIME)
    nodes: int = Field(1, ge=1)
    tasks_per_node: int = Field(1, ge=1)  # torchrun agents per node: 1 on a real cluster
    gpus_per_node: int = Field(4, ge=0)  # 0: CPU (gloo); processes per node = max(gpus_per_node, 1)
    signal_lead_s: int = Field(360, ge=60)  # SIGUSR1 this long before the time limit (--signal=USR1@...)
    rdzv_port: int = Field(29500, ge=1024, le=65535)


class SlurmTune(SlurmJob):
    time: str = Field("12:00:00", pattern=_TIME)
    tasks: int = Field(4, ge=1)  # array tasks sharing one study
    gpus_per_task: int = Field(1, ge=0)
    # journal:<path> (Optuna JournalStorage on shared storage) or an RDB URL such as postgresql://...; never SQLite.
    # None: journal:optuna/<study>.journal under the project root.
    storage: str | None = None
    study: str | None = None  # None: headct-sweep-<array job id>

    @field_validator("storage")
    @classmethod
    def _not_sqlite(cls, v: str | None) -> str | None:
        if v is not None and v.startswith("sqlite:"):
            raise ValueError("slurm.tune.storage: SQLite is unsafe for concurrent workers on shared storage; use "
                             "journal:<path on shared storage> or postgresql://...")
        return v


class SlurmConfig(Section):
    """Where the templates are, where the logs go, the cluster's partition/account, and each job's resources."""

    templates: Path = Path("slurm")
    log_dir: Path = Path("logs/slurm")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    # HEADCT_EXEC: a prefix for every command (e.g. "apptainer exec --nv --bind /shared headct.sif"); None: none
    exec_prefix: str | None = None
    setup: str | None = None  # HEADCT_SETUP: a shell line each job runs first (e.g. "source .venv/bin/activate")
    sbatch_args: list[str] = Field(default_factory=list)  # any other sbatch options, e.g. ["--constraint=a100"]
    ingest: SlurmIngest = Field(default_factory=SlurmIngest)
    pretrain: SlurmPretrain = Field(default_factory=SlurmPretrain)
    tune: SlurmTune = Field(default_factory=SlurmTune)
