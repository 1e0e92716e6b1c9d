"""Few-shot sampling (patient-level, without replacement, seed-stable), retrieval mAP, the HU-histogram baseline."""

from __future__ import annotations

import numpy as np
import pytest

from headct.eval.fewshot import sample_shots, spread
from headct.eval.histogram import hu_histogram
from headct.eval.probe import LabelData
from headct.eval.retrieval import retrieval_map


def train_set(n_patients: int = 40, scans_per_patient: int = 3, positive_every: int = 4) -> LabelData:
    """Patients with several scans; every `positive_every`-th patient has one positive scan, the rest negative."""
    patient = np.repeat([f"pat_{p:03d}" for p in range(n_patients)], scans_per_patient)
    y = np.zeros(len(patient), dtype=np.int8)
    for p in range(0, n_patients, positive_every):
        y[p * scans_per_patient + 1] = 1
    scan = np.array([f"ser_{i:04d}" for i in range(len(y))])
    return LabelData(np.zeros((len(y), 2), np.float32), y, scan, patient)


def test_shots_are_patient_disjoint_without_replacement_and_balanced() -> None:
    data = train_set()
    for k in (1, 2, 4, 8):
        index = sample_shots(data, k, seed=3, label="ICH").index
        assert index is not None and len(index) == 2 * k
        assert list(data.y[index]) == [1] * k + [0] * k
        patients = data.patient_id[index]
        assert len(set(patients)) == 2 * k, "one scan per patient, no patient twice"
        assert not set(patients[:k]) & set(data.patient_id[data.y == 1]) ^ set(patients[:k])
        # a negative scan never comes from a patient who has a positive scan
        assert not set(patients[k:]) & set(data.patient_id[data.y == 1])


def test_shots_are_seed_stable_differ_across_seeds_and_nest_across_k() -> None:
    data = train_set()
    a = sample_shots(data, 4, seed=0, label="ICH").index
    assert np.array_equal(a, sample_shots(data, 4, seed=0, label="ICH").index)
    assert not np.array_equal(a, sample_shots(data, 4, seed=1, label="ICH").index)
    assert not np.array_equal(a, sample_shots(data, 4, seed=0, label="SDH").index)
    k2 = sample_shots(data, 2, seed=0, label="ICH").index
    assert set(k2[:2]) <= set(a[:4]) and set(k2[2:]) <= set(a[4:])


def test_an_impossible_k_is_skipped_with_a_message() -> None:
    sample = sample_shots(train_set(), 16, seed=0, label="ICH")  # 10 positive patients
    assert sample.index is None
    assert (
        sample.reason
        == "K=16 needs 16 positive and 16 negative train patients; train has 10 positive and 30 negative"
    )


def test_spread_reports_mean_std_min_max() -> None:
    assert spread([0.6, 0.8]) == pytest.approx(
        {"mean": 0.7, "std": 0.1414213, "min": 0.6, "max": 0.8, "n_seeds": 2}
    )
    assert spread([0.5])["std"] == 0.0


def test_retrieval_map_is_one_when_separable_and_about_prevalence_when_random() -> None:
    rng = np.random.default_rng(0)
    y = (np.arange(200) % 4 == 0).astype(int)  # prevalence 0.25
    patients = np.arange(200) // 2  # pairs of scans; a pair may mix labels here
    separable = np.stack([y + 0.01 * rng.random(200), 1 - y + 0.01 * rng.random(200)], axis=1)
    assert retrieval_map(separable, y, patients)["map"] == pytest.approx(1.0)
    random = retrieval_map(rng.normal(size=(200, 16)), y, patients)
    assert random["chance"] == pytest.approx(0.25) and abs(random["map"] - 0.25) < 0.07


def test_retrieval_excludes_the_query_patients_own_scans() -> None:
    # Each positive's only close neighbour is its own patient's twin scan; excluded, so it cannot lift mAP to 1.
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    patients = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    x = np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1], [1, 0.02], [0.02, 1], [1, 0.03], [0.03, 1]])
    assert retrieval_map(x, y, patients)["map"] < 0.9


def test_histogram_baseline_separates_a_dense_blob_class() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    volumes = np.full((40, 16, 16, 16), -1024, np.int16)
    volumes[:, 3:13, 3:13, 3:13] = rng.normal(35, 8, (40, 10, 10, 10)).astype(np.int16)  # brain
    y = np.arange(40) % 2
    volumes[y == 1, 6:9, 6:9, 6:9] = rng.normal(70, 5, (20, 3, 3, 3)).astype(np.int16)  # a bleed-like blob
    features = hu_histogram(volumes)
    assert features.shape == (40, 64 + 5)
    assert np.allclose(features[:, 64:].sum(axis=1), 1.0)  # coarse bins cover every voxel
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))  # the probe protocol
    assert cross_val_score(probe, features, y, cv=4, scoring="roc_auc").mean() > 0.95
