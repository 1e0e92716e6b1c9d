"""The one reader of canonical volumes (headct.data.volumes.load_volume): every check names the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.config import PreprocessSpec
from headct.data.volumes import check_volume, load_volume
from headct.errors import InputError
from tests.store_helpers import write_store

SPEC = PreprocessSpec(shape=(16, 16, 16), spacing_mm=6.0)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    volumes = {f"ser_{i:04d}": rng.integers(-1024, 1500, size=(16, 16, 16)).astype(np.int16) for i in range(3)}
    volumes["ser_f32"] = np.zeros((16, 16, 16), np.float32)  # in the manifest, but not int16
    volumes["ser_flat"] = np.zeros((16, 16, 8), np.int16)  # in the manifest, but not on the store's grid
    write_store(tmp_path / "store", volumes, spec=SPEC)
    return tmp_path / "store"


def test_a_store_volume_reads_back_exactly_and_is_checked_once(store: Path) -> None:
    path = store / "volumes/ser_0001.npy"
    volume = load_volume(path, "ser_0001", shape=(16, 16, 16), version=SPEC.version)
    assert volume.dtype == np.int16 and np.array_equal(volume, np.load(path))
    assert np.array_equal(load_volume(path), volume)  # a second read (verified already) gives the same voxels
    check_volume(path, "ser_0001", shape=(16, 16, 16))


@pytest.mark.parametrize("name, kwargs, message", [
    ("ser_0009", {}, r"ser_0009\.npy: volume file not found"),
    ("ser_0001", {"scan_id": "ser_0002"}, r"ser_0001\.npy: the split names this file as scan 'ser_0002'"),
    ("ser_f32", {}, r"ser_f32\.npy: expected a 3-D int16 HU volume, got float32"),
    ("ser_flat", {}, r"ser_flat\.npy: shape \[16, 16, 8\] differs from the store's grid \[16, 16, 16\]"),
    ("ser_0001", {"shape": (32, 32, 32)}, r"ser_0001\.npy: shape \[16, 16, 16\] differs from the model's"),
    ("ser_0001", {"version": "abc"}, rf"preprocess\.json: preprocessing version {SPEC.version} differs from the "
                                     r"model's abc"),
])
def test_each_check_names_the_file_and_the_reason(store: Path, name: str, kwargs: dict, message: str) -> None:
    for reader in (load_volume, check_volume):
        with pytest.raises(InputError, match=message):
            reader(store / f"volumes/{name}.npy", **kwargs)


def test_a_file_changed_after_ingest_or_unknown_to_the_manifest_is_refused(store: Path, tmp_path: Path) -> None:
    path = store / "volumes/ser_0000.npy"
    volume = load_volume(path)
    volume[0, 0, 0] += 1
    np.save(path, volume)  # same dtype and shape: only the hash can tell
    with pytest.raises(InputError, match=r"ser_0000\.npy: SHA-256 \w+\.\.\. differs from the manifest's"):
        load_volume(path)
    np.save(store / "volumes/ser_0777.npy", volume)  # a leftover of another run
    with pytest.raises(InputError, match=r"ser_0777\.npy: scan ser_0777 is not in .*manifest\.parquet"):
        load_volume(store / "volumes/ser_0777.npy")
    np.save(tmp_path / "loose.npy", volume)
    with pytest.raises(InputError, match=r"loose\.npy: not a canonical store volume"):
        load_volume(tmp_path / "loose.npy")


def test_a_scan_made_with_another_recipe_than_the_store_says_is_refused(store: Path) -> None:
    manifest = pd.read_parquet(store / "manifest.parquet")
    manifest.loc[manifest["scan_id"] == "ser_0002", "preprocess_version"] = "old"
    manifest.to_parquet(store / "manifest.parquet", index=False)  # the index is re-read: the file changed
    with pytest.raises(InputError, match=r"ser_0002\.npy: scan ser_0002 was made with preprocessing old"):
        load_volume(store / "volumes/ser_0002.npy")
    (store / "preprocess.json").write_text(json.dumps({"version": "x"}))
    with pytest.raises(InputError, match=r"preprocess\.json: no preprocessing 'version' and 'shape'"):
        load_volume(store / "volumes/ser_0001.npy")


def _split_of(store: Path) -> Path:
    """A split folder whose split.json names `store` (relative to its parent, the project root)."""
    split = store.parent / "splits"
    split.mkdir()
    (split / "split.json").write_text(json.dumps({"store": store.name, "seed": 0}))
    return split


@pytest.mark.parametrize("preprocess, problem", [
    ({"version": "v2"}, rf"preprocess\.json: preprocessing version {SPEC.version} differs from the model's v2 "
                        r"\(models/m/config\.json\)"),
    ({"shape": [16, 16, 16]}, r"models/m/config\.json: no preprocess version recorded"),  # e.g. imported weights
    (None, r"models/m/config\.json: no preprocess version recorded"),
])
def test_a_model_not_made_for_the_store_is_refused_unless_explicitly_allowed(
    store: Path, capsys: pytest.CaptureFixture, preprocess: dict | None, problem: str
) -> None:
    from headct.data.volumes import check_preprocessing

    split, source = _split_of(store), Path("models/m/config.json")
    config = {} if preprocess is None else {"preprocess": preprocess}
    with pytest.raises(InputError, match=problem + r".*or set probe\.allow_preprocess_mismatch: true"):
        check_preprocessing(split, store.parent, config, source, setting="probe.allow_preprocess_mismatch")
    warned = check_preprocessing(split, store.parent, config, source, allow_mismatch=True,
                                 setting="probe.allow_preprocess_mismatch")
    assert warned is not None and warned.endswith("going on because probe.allow_preprocess_mismatch is true")
    assert "warning: " in capsys.readouterr().err
    same = {"preprocess": {**SPEC.model_dump(mode="json"), "version": SPEC.version}}
    assert check_preprocessing(split, store.parent, same, source) is None


def test_class_balanced_draws_are_a_function_of_the_step_and_favour_the_rare_class() -> None:
    from headct.data.volumes import WeightedStepSampler, class_balanced_weights

    targets = np.array([[1.0], [0.0], [0.0], [0.0], [np.nan]], np.float32)  # one positive, one unknown
    p = class_balanced_weights(targets)
    assert np.isclose(p.sum(), 1.0) and p[0] == p.max() and np.isclose(p[0], p[1:4].sum())
    full = list(WeightedStepSampler(p, 4, seed=3, start_step=0, total_steps=50, stream=12))
    assert list(WeightedStepSampler(p, 4, seed=3, start_step=20, total_steps=50, stream=12)) == full[20:]
    assert list(WeightedStepSampler(p, 4, seed=3, start_step=0, total_steps=50, stream=13)) != full
    drawn = np.bincount([i for step in full for i in step], minlength=5)
    assert 0.35 < drawn[0] / drawn.sum() < 0.65  # the single positive is drawn about as often as all negatives
