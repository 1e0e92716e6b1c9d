"""RSNA 2019 from its download (issue 11): the flat `stage_2_train/` folder and `stage_2_train.csv`, dirty as it
comes, through `headct ingest SRC DEST --set ingest.labels=... --set ingest.labels_format=rsna2019`, on real
pydicom-written files.

The fixture (tests/rsna_fixture.py) writes the challenge's layout: one slice per file named `ID_<hex>.dcm`,
anonymised `ID_<hex>` identifiers instead of UIDs, no SliceThickness/InstanceNumber/SeriesDescription/ImageType.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import MARKER_HU  # noqa: E402
from ingest_helpers import EXPECTED_MARKER_RAS, TEST_KEY, hu_at, marker_ras  # noqa: E402
from rsna_fixture import label_rows, skull_of, write_exam, write_labels  # noqa: E402

from headct.data import store  # noqa: E402
from headct.data.identity import KEY_ENV, KEY_FILE_ENV, Pseudonymizer  # noqa: E402
from headct.data.label_sources import ISSUES  # noqa: E402

PSEUDO = Pseudonymizer(TEST_KEY.encode())
LABELS = ["ICH", "IPH", "IVH", "SDH", "EDH", "SAH"]  # LABELS order of RSNA's six subtypes
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # `ID_<hex>` is not a UID


@pytest.fixture(autouse=True)
def _test_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, TEST_KEY)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def test_the_dirty_download_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import cli

    raw = tmp_path / "rsna"
    flat = raw / "stage_2_train"
    rng = random.Random(2019)
    good = write_exam(flat, rng, "ok", n_slices=24)
    wrapped = write_exam(flat, rng, "wrapped", n_slices=22)  # air read +3096 HU: corrected
    ambiguous = write_exam(flat, rng, "wrapped", n_slices=20, phantom=skull_of(2500.0))  # bone or below air?
    misdeclared = write_exam(flat, rng, "no_offset", n_slices=20)  # air at +24 HU: no correction makes it HU
    lone = write_exam(raw / "spare", rng, "ok", n_slices=1).sops[0]
    (flat / f"{lone}.dcm").write_bytes((raw / "spare" / f"{lone}.dcm").read_bytes()[:300])  # truncated copy
    assert sorted(p.parent for p in flat.rglob("*")) == [flat] * (24 + 22 + 20 + 20 + 1)  # flat: no subfolders

    rows = label_rows(good.sops, {3: {"subdural", "any"}, 4: {"subdural", "any"}})
    rows.append(rows[0])  # an identical repeat: counted
    rows += label_rows(wrapped.sops)
    rows.append((f"{wrapped.sops[5]}_epidural", "1"))  # contradicts the 0 row: this slice's EDH is unknown
    rows += label_rows(ambiguous.sops) + label_rows(misdeclared.sops, {0: {"epidural", "any"}})
    rows += label_rows([lone])  # its file is unreadable
    rows += label_rows(["ID_0badc0ffe", "ID_0badc0fff"])  # no file in the download
    random.Random(0).shuffle(rows)
    labels_csv = write_labels(raw / "stage_2_train.csv", rows)

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(
        f"tracking:\n  uri: sqlite:///{tmp_path}/mlflow.db\ningest:\n  preprocess:\n    shape: [32, 32, 32]\n"
        "    spacing_mm: 6.0\n  workers: 1\n  qc:\n    min_slices: 8\n    min_coverage_mm: 30.0\n")
    monkeypatch.chdir(project)
    result = CliRunner().invoke(cli.app, ["ingest", str(flat), "store", "--set", f"ingest.labels={labels_csv}",
                                          "--set", "ingest.labels_format=rsna2019"])
    assert result.exit_code == 0, result.output
    dest = project / "store"
    summary = json.loads((project / "reports" / "ingest" / "metrics.json").read_text())
    assert summary["accepted"] == 2 and summary["rejected"] == {"not_hu": 2}
    assert summary["files_unreadable"] == 1 and summary["files_dicom"] == 24 + 22 + 20 + 20

    # exams reassembled from the headers' anonymised identifiers; the wrapped one corrected, and said so
    manifest = store.read_manifest(dest).set_index("scan_id")
    ok, fixed = PSEUDO.series(good.series), PSEUDO.series(wrapped.series)
    assert sorted(manifest.index) == sorted([ok, fixed])
    assert manifest.loc[ok, "pixel_fix"] == "" and manifest.loc[fixed, "pixel_fix"] == "signed_12bit"
    assert manifest.loc[ok, "n_slices"] == 24 and manifest.loc[fixed, "n_slices"] == 22
    assert manifest.loc[fixed, "slice_thickness_mm"] == 5.0  # no SliceThickness: the slice step
    for scan in (ok, fixed):  # physically plausible HU, anatomy where the phantom put it
        row = manifest.loc[scan]
        volume, affine = store.read_volume(dest, row["volume"]), store.affine_of(row)
        assert volume.min() <= -1000 and volume.max() >= MARKER_HU - 100
        assert abs(hu_at(volume, affine, (0.0, 0.0, 0.0)) - 35) <= 5  # brain, not air read as +3096
        assert np.abs(marker_ras(volume, affine) - EXPECTED_MARKER_RAS).max() <= 3.0
    rejects = pd.read_csv(dest / store.REJECTS).set_index("series_id")
    assert rejects.loc[PSEUDO.series(ambiguous.series), "reason"] == "not_hu"
    assert "ambiguous" in rejects.loc[PSEUDO.series(ambiguous.series), "message"]
    assert rejects.loc[PSEUDO.series(misdeclared.series), "reason"] == "not_hu"

    # exam label = max over its slices per subtype; a conflicting slice leaves a 0 unproven
    labels = pd.read_csv(dest / store.LABELS, dtype=str, keep_default_na=False).set_index("scan_id")
    assert labels.loc[ok, LABELS].tolist() == ["1", "0", "0", "1", "0", "0"]
    assert labels.loc[fixed, LABELS].tolist() == ["0", "0", "0", "0", "", "0"]

    # label-side problems: counts by reason, no identifiers
    issues = dict(pd.read_csv(dest / ISSUES).itertuples(index=False))
    assert issues == {"rows_duplicated": 2, "values_conflicting": 1, "keys_unmatched": 20 + 20 + 1 + 2,
                      "keys_series_not_accepted": 40, "keys_file_unreadable": 1, "keys_not_in_source": 2,
                      "scans_partial": 0, "scans_unlabelled": 0}
    shared = "".join((dest / name).read_text() for name in (ISSUES, store.LABELS, store.REJECTS))
    shared += manifest.reset_index().to_csv() + json.dumps(summary)
    every_id = [good.study, good.series, good.patient, *good.sops, wrapped.series, lone, "ID_0badc0ffe"]
    assert not any(key in shared for key in every_id) and "ID_" not in shared
