"""Pydantic models for every ``params.yaml`` section, and the loader that resolves them.

Precedence, lowest first: code defaults < params.yaml < tuned-parameters file (fine-tuning only)
< ``--set section.key=value``; a params file may not set a key the tuned file owns (refused, not overridden). Every model forbids unknown keys, so a typo is an error that names the key
before any work starts. This package imports only pydantic/yaml so ``headct --help`` stays instant.

One module per stage group, so a DVC stage depends only on the config code its job reads
(scripts/dvc_deps.py derives those deps from the imports):

- ``base``: the ``Section`` base, ``Label``/``LABELS``, windows, ``PreprocessSpec``, the ``tracking`` section,
  ``JobContext`` and the path helpers (``resolve_path``, ``dump_params``, ``with_absolute_paths``)
- ``data``: synth, ingest (+ QC rules), split; ``pretrain``: pretrain (+ dino)
- ``evaluate``: extract, probe, fewshot, retrieval, explain, compare, report; ``finetune``: finetune, tune, predict
- ``params``: ``Params``, the whole file; ``loader``: ``load_params`` and what it needs

Importing this package imports them all: jobs and library modules import the submodule they need
(``from headct.config.evaluate import ProbeConfig``); the CLI, tests and scripts may use the names below.
"""

from headct.config.base import (
    DEFAULT_WINDOWS,
    LABELS,
    PREPROCESS_MODES,
    JobContext,
    Label,
    PreprocessSpec,
    Section,
    TrackingConfig,
    Window,
    dump_params,
    resolve_path,
    with_absolute_paths,
)
from headct.config.data import IngestConfig, QcRules, SplitConfig, SynthConfig
from headct.config.evaluate import (
    CompareConfig,
    ExplainConfig,
    ExtractConfig,
    FewshotConfig,
    ModelName,
    Pool,
    ProbeConfig,
    ReportConfig,
    RetrievalConfig,
    Shots,
)
from headct.config.finetune import (
    MAX_ATTENTION_HEADS,
    TUNED_KEYS,
    CeilingConfig,
    FinetuneConfig,
    PredictConfig,
    TuneConfig,
)
from headct.config.loader import (
    ConfigError,
    find_project_root,
    format_validation_error,
    load_params,
    read_tuned_params,
    refuse_tuned_keys,
)
from headct.config.params import Params
from headct.config.pretrain import DinoConfig, PretrainConfig
from headct.config.slurm import SlurmConfig, SlurmIngest, SlurmJob, SlurmPretrain, SlurmTune

__all__ = [
    "DEFAULT_WINDOWS",
    "LABELS",
    "CompareConfig",
    "MAX_ATTENTION_HEADS",
    "ConfigError",
    "DinoConfig",
    "ExplainConfig",
    "ExtractConfig",
    "FewshotConfig",
    "CeilingConfig",
    "FinetuneConfig",
    "IngestConfig",
    "JobContext",
    "Label",
    "ModelName",
    "Params",
    "Pool",
    "PredictConfig",
    "PREPROCESS_MODES",
    "PreprocessSpec",
    "PretrainConfig",
    "ProbeConfig",
    "QcRules",
    "ReportConfig",
    "RetrievalConfig",
    "Section",
    "Shots",
    "SlurmConfig",
    "SlurmIngest",
    "SlurmJob",
    "SlurmPretrain",
    "SlurmTune",
    "SplitConfig",
    "SynthConfig",
    "TUNED_KEYS",
    "TrackingConfig",
    "TuneConfig",
    "Window",
    "dump_params",
    "find_project_root",
    "format_validation_error",
    "load_params",
    "read_tuned_params",
    "refuse_tuned_keys",
    "resolve_path",
    "with_absolute_paths",
]
