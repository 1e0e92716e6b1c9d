"""Oracle and HU-histogram AUROC per label and severity stratum (headct/eval/learnability.py, the script)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from headct.data.store import volume_relpath
from headct.data.store_meta import META
from headct.errors import InputError
from headct.eval.learnability import by_stratum, learnability

REPO = Path(__file__).resolve().parent.parent


def make_project(root: Path, n: int = 90, seed: int = 0) -> tuple[Path, Path]:
    """A store of 16^3 volumes (brain 30 HU; ICH positives get a 70 HU blob whose size follows the bleed volume),
    its meta.csv and split files. A third of the positives are 'invisible': no voxel visible to the oracle."""
    rng = np.random.default_rng(seed)
    store, splits = root / "store", root / "splits"
    (store / "volumes").mkdir(parents=True)
    splits.mkdir()
    rows, meta = [], []
    for i in range(n):
        scan, patient = f"ser_{i:04d}", f"pat_{i:04d}"
        ich = int(i % 3 != 0)
        bleed = float(rng.choice([2.0, 12.0, 60.0])) if ich else 0.0
        vol = rng.normal(30, 4, (16, 16, 16)).clip(-1024).astype(np.int16)
        if ich:
            side = {2.0: 2, 12.0: 4, 60.0: 7}[bleed]
            vol[:side, :side, :side] = 70
        np.save(store / volume_relpath(scan), vol)
        visible = 0 if ich and i % 9 == 1 else side**3 if ich else 0
        rows.append({"img_path": f"store/{volume_relpath(scan)}", "scan_id": scan, "patient_id": patient,
                     "ICH": ich, "Tumor": int(i % 5 == 0)})
        meta.append({"scan_id": scan, "patient_id": patient, "bleed_ml": bleed, "Tumor_ml": 1.0 if i % 5 == 0 else "",
                     "visible_bleed": visible, "visible_Tumor": 0})
    pd.DataFrame(meta).to_csv(store / META, index=False)
    frame = pd.DataFrame(rows)
    for name, part in zip(("train", "val", "test"), np.array_split(np.arange(n), 3), strict=True):
        frame.iloc[part].to_csv(splits / f"{name}.csv", index=False)
    return store, splits


def test_stratum_auroc_is_its_positives_against_all_negatives() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.9, 0.05, 0.5, 0.95, 0.99])
    volume = np.array([0, 0, 0, 0, 1.0, 10.0, 50.0, 50.0])
    patients = np.array([f"p{i}" for i in range(8)])
    out = by_stratum(y, score, patients, volume, 50, 0)
    assert out["<5mL"]["n_pos"] == 1 and out["<5mL"]["n_neg"] == 4 and out["<5mL"]["auroc"] == 0.0
    assert out["5-30mL"]["auroc"] == 0.75 and out[">30mL"]["auroc"] == 1.0 and out[">30mL"]["n_pos"] == 2
    assert out["all"]["auroc"] == pytest.approx((0 + 3 + 4 + 4) / 16)


def test_oracle_and_histogram_per_stratum(tmp_path: Path) -> None:
    store, splits = make_project(tmp_path)
    report = learnability(store, splits, ["ICH", "Tumor"], n_resamples=50, seed=0)
    oracle = report["results"]["oracle"]["ICH"]
    test = pd.read_csv(splits / "test.csv")
    n_pos = int(test["ICH"].sum())
    assert oracle["all"]["n_pos"] == n_pos and oracle["all"]["n_neg"] == len(test) - n_pos
    assert sum(oracle[s]["n_pos"] for s in report["strata"]) == n_pos
    assert all(oracle[s]["n_neg"] == len(test) - n_pos for s in report["strata"])
    # invisible positives tie with the negatives at 0: AUROC = (1 + share visible) / 2
    visible = pd.read_csv(store / META).set_index("scan_id").loc[test.loc[test["ICH"] == 1, "scan_id"], "visible_bleed"]
    assert oracle["all"]["auroc"] == pytest.approx((1 + (visible > 0).mean()) / 2)
    assert oracle["all"]["auroc_low"] <= oracle["all"]["auroc"] <= oracle["all"]["auroc_high"]
    assert report["results"]["oracle"]["Tumor"]["all"]["auroc"] == 0.5  # nothing visible: chance
    histogram = report["results"]["hu_histogram"]["ICH"]
    assert histogram[">30mL"]["auroc"] > 0.9 and histogram["all"]["auroc"] > 0.7  # blood HU in the histogram
    assert set(report["results"]["hu_histogram"]["Tumor"]) == {"all", *report["strata"]}


def test_script_prints_the_table_and_names_a_missing_meta(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import learnability as script

    store, splits = make_project(tmp_path, n=45)
    assert script.main(["--store", str(store), "--splits", str(splits), "--labels", "ICH", "--bootstrap", "20",
                        "--json", str(tmp_path / "out.json")]) == 0
    printed = capsys.readouterr().out
    assert "oracle" in printed and "hu_histogram" in printed and ">30mL" in printed
    assert (tmp_path / "out.json").is_file()
    (store / META).unlink()
    assert script.main(["--store", str(store), "--splits", str(splits), "--labels", "ICH"]) == 1
    assert str(store / META) in capsys.readouterr().err
    with pytest.raises(InputError, match="not found"):
        learnability(store, splits, ["ICH"])
