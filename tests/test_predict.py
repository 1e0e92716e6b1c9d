"""`headct predict` and `Encoder.embed(path)`: one study through the ingest code and a model (tiny; CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, nifti_of, write_series  # noqa: E402
from ingest_helpers import SPEC, TEST_KEY, make_cfg, only_volume, run_ingest  # noqa: E402

from headct.config import JobContext, PredictConfig  # noqa: E402
from headct.errors import InputError  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
WINDOWS = [{"name": "brain", "level": 40, "width": 80}, {"name": "subdural", "level": 80, "width": 200},
           {"name": "bone", "level": 600, "width": 2800}]
PREPROCESS = {**SPEC.model_dump(mode="json"), "version": SPEC.version}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from headct.models.classifier_dir import save_classifier
    from headct.models.heads import Classifier
    from headct.models.model_dir import save_model_dir
    from headct.models.vit import build_encoder

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    enc = build_encoder({"name": "tiny", "img_size": 32, "patch_size": 16, "in_chans": 3, "depth": 2})
    save_model_dir(root / "encoder", enc, {"preprocess": PREPROCESS, "windows": WINDOWS, "method": "mae",
                                           "provenance": {}})
    save_classifier(root / "classifier", Classifier(enc, "mean", 2).eval(),
                    {"labels": ["ICH", "Fracture"], "thresholds": {"ICH": 0.5, "Fracture": 0.0},
                     "windows": WINDOWS, "preprocess": PREPROCESS})
    return root


def write_study(folder: Path) -> Path:
    write_series(folder / "axial", SeriesSpec(), study_uid="1.2.826.0.1.3680043.8.498.1",
                 patient_id="PID-SECRET-77", patient_name="Secret^Person")
    write_series(folder / "scout", SeriesSpec(n_slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
                 study_uid="1.2.826.0.1.3680043.8.498.1", patient_id="PID-SECRET-77", patient_name="Secret^Person")
    return folder


def test_predict_scores_the_series_ingest_would_choose_and_names_what_qc_set_aside(
    tmp_path: Path, models: Path, job_ctx: JobContext, monkeypatch
) -> None:
    from headct.models.classifier_dir import load_classifier, predict_proba
    from pipelines.predict import run

    study = write_study(tmp_path / "study")
    out_json = tmp_path / "prediction.json"
    out = run(PredictConfig(study=study, classifier_dir=models / "classifier", out=out_json, device="cpu"), job_ctx)
    (result,) = out["results"]
    assert result["series"]["n_slices"] == 32 and result["series"]["kernel"] == "H30s"
    assert [r["reason"] for r in out["set_aside"]] == ["localizer"]
    # The same numbers as the classifier on the volume a regular `headct ingest` of this folder stores.
    cfg = make_cfg(tmp_path / "reference", src=study)
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", TEST_KEY)  # a regular ingest of this (non-synthetic) folder
    run_ingest(cfg)
    volume, _, _ = only_volume(cfg)
    classifier, _ = load_classifier(models / "classifier")
    expected = predict_proba(classifier, volume)[0]
    assert [f["probability"] for f in result["findings"].values()] == pytest.approx(expected, abs=1e-4)
    # This classifier directory has no validation record (as before issue 15): probabilities, never a decision,
    # even at threshold 0 where every probability would be "positive".
    assert all(f["positive"] is None and not f["validated"] for f in result["findings"].values())
    text = out_json.read_text()
    for secret in ("PID-SECRET-77", "Secret^Person", "1.2.826.0.1.3680043.8.498.1"):
        assert secret not in text


def test_embed_takes_a_dicom_folder_or_a_nifti_file_like_the_store_volume(tmp_path: Path, models: Path,
                                                                         monkeypatch) -> None:
    import headct

    encoder = headct.load_encoder(models / "encoder")
    write_series(tmp_path / "dicom" / "s", SeriesSpec())
    nib.save(nifti_of(SeriesSpec()), tmp_path / "head.nii.gz")
    cfg = make_cfg(tmp_path / "reference", src=tmp_path / "dicom")
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", TEST_KEY)
    run_ingest(cfg)
    volume, _, _ = only_volume(cfg)
    from_store = encoder.embed(volume)
    assert np.allclose(encoder.embed(tmp_path / "dicom"), from_store, atol=1e-5)
    assert np.allclose(encoder.embed(tmp_path / "head.nii.gz"), from_store, atol=1e-3)
    with pytest.raises(InputError, match="expected canonical volumes of shape"):
        encoder.embed(np.zeros((16, 16, 16), np.int16))


def test_a_study_with_nothing_usable_is_refused_with_the_reasons(tmp_path: Path, models: Path, job_ctx) -> None:
    from pipelines.predict import run

    write_series(tmp_path / "scout" / "s", SeriesSpec(n_slices=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")))
    with pytest.raises(InputError, match=r"no series passed quality control \(localizer"):
        run(PredictConfig(study=tmp_path / "scout", classifier_dir=models / "classifier", device="cpu"), job_ctx)
    with pytest.raises(InputError, match="expected a DICOM folder or a .nii"):
        (tmp_path / "notes.txt").write_text("x")
        run(PredictConfig(study=tmp_path / "notes.txt", classifier_dir=models / "classifier", device="cpu"), job_ctx)
