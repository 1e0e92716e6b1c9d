"""``Params``: the whole of params.yaml, one field per section, and the checks that span sections."""

from __future__ import annotations

from pydantic import Field, model_validator

from headct.config.base import Section, TrackingConfig
from headct.config.data import IngestConfig, SplitConfig, SynthConfig
from headct.config.evaluate import (
    CompareConfig,
    ExplainConfig,
    ExtractConfig,
    FewshotConfig,
    ProbeConfig,
    ReportConfig,
    RetrievalConfig,
)
from headct.config.finetune import CeilingConfig, FinetuneConfig, PredictConfig, TuneConfig
from headct.config.pretrain import PretrainConfig
from headct.config.slurm import SlurmConfig


class Params(Section):
    """The whole of params.yaml."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    fewshot: FewshotConfig = Field(default_factory=FewshotConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    ceiling: CeilingConfig = Field(default_factory=CeilingConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    explain: ExplainConfig = Field(default_factory=ExplainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    slurm: SlurmConfig = Field(default_factory=SlurmConfig)

    @model_validator(mode="after")
    def _coherent(self) -> Params:
        if self.pretrain.arch and any(s % self.pretrain.patch_size for s in self.ingest.preprocess.shape):
            raise ValueError(
                f"pretrain.patch_size={self.pretrain.patch_size} must divide every dimension of "
                f"ingest.preprocess.shape={list(self.ingest.preprocess.shape)}"
            )
        return self
