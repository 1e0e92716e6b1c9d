"""Run identity (headct.run_identity): trajectory markers on the config models, run keys, and the amp rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headct.config import FinetuneConfig, PretrainConfig, TuneConfig
from headct.device import amp_dtype
from headct.run_identity import run_key, trajectory_params


class _Data:  # what pretrain.run_identity reads of PretrainData
    provenance = {"train_ids_sha256": "abc"}
    preprocess = {"shape": [64, 64, 64]}


def test_output_and_cadence_settings_do_not_change_a_key_and_training_settings_do() -> None:
    base = trajectory_params(PretrainConfig())
    for change in ({"report_dir": Path("elsewhere")}, {"log_every": 7}, {"workers": 3}, {"figure_every": 5},
                   {"checkpoint_every": 9}, {"device": "cpu"}, {"register_as": None}):
        assert trajectory_params(PretrainConfig(**change)) == base, change
    for change in ({"lr": 2e-3}, {"seed": 1}, {"mask_ratio": 0.5}, {"dino": {"teacher_temp": 0.05}}):
        assert trajectory_params(PretrainConfig(**change)) != base, change
    assert "dino" in base and "report_dir" not in base  # nested sections are kept (filtered by their own markers)
    finetune = trajectory_params(FinetuneConfig())
    assert trajectory_params(FinetuneConfig(bootstrap=50, out_dir=Path("x"), threads=2)) == finetune
    assert trajectory_params(FinetuneConfig(head_lr=0.5)) != finetune
    assert trajectory_params(TuneConfig(n_trials=99, storage="sqlite:///x.db")) == trajectory_params(TuneConfig())


def test_the_pretrain_run_key_of_the_default_params_is_unchanged() -> None:
    """A resumable pre-training run keeps its checkpoint folder across code versions; a new config field or marker
    that changes this key makes every interrupted default run start again (update the key only on purpose)."""
    from pipelines.pretrain import run_identity

    assert run_key(run_identity(PretrainConfig(), _Data(), 1)) == "2e6adc12f107"
    assert run_key(run_identity(PretrainConfig(method="dino"), _Data(), 1)) == "430b2ca2a042"
    assert run_key(run_identity(PretrainConfig(), _Data(), 2)) != "2e6adc12f107"  # ranks change the samples


def test_one_amp_rule() -> None:
    assert amp_dtype("auto", torch.device("cpu")) is None and amp_dtype("off", "cuda") is None
    assert amp_dtype("auto", "cuda") is torch.bfloat16 and amp_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="amp must be"):
        amp_dtype("fp16", "cpu")
