"""The validation gate (issue 15): validated performance travels with the classifier and gates every decision.

A classifier fine-tuned on separable synthetic data (ICH: a brighter brain) validates that label and decides it;
its noise label (SDH) and a classifier at chance validate nothing and decide nothing - in config.json, in
`headct predict` (through the real CLI), in its JSON, in `FindingClassifier.decisions()` and in the MLflow
model version's description. Tiny shapes (32^3, a one-block ViT); CPU.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dicom_factory import SeriesSpec, write_series  # noqa: E402
from finetune_helpers import SIZE, TINY_ARCH, WINDOWS, finetune_cfg  # noqa: E402
from store_helpers import write_store  # noqa: E402

from headct.config import JobContext, PreprocessSpec  # noqa: E402
from headct.errors import InputError  # noqa: E402
from headct.eval.validation_gate import NO_RECORD, GateRule, UnvalidatedLabelError, judge  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")
N_TRAIN, N_VAL, N_TEST = 24, 48, 16  # val: 24 ICH positives, above the default min_val_positives of 20


def make_separable_project(root: Path) -> Path:
    """A 32^3 store, one scan per patient: ICH = a brain 40 HU brighter (separable), SDH = independent coin flips;
    train/val/test of 24/48/16 patients, and a tiny model directory."""
    from headct.models.model_dir import save_model_dir
    from headct.models.vit import build_encoder

    rng = np.random.default_rng(0)
    spec = PreprocessSpec(shape=(SIZE, SIZE, SIZE), spacing_mm=6.0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, SIZE)] * 3, indexing="ij"))
    dist = np.sqrt((g ** 2).sum(0))
    n = N_TRAIN + N_VAL + N_TEST
    ich = np.arange(n) % 2
    sdh = rng.permutation(np.arange(n) % 2)
    volumes, rows = {}, []
    for i in range(n):
        vol = np.where(dist < 0.75, 1000.0, -1024.0)
        vol[dist < 0.65] = 70.0 if ich[i] else 30.0
        volumes[f"ser_{i:016x}"] = (vol + rng.normal(0, 5, vol.shape)).astype(np.int16)
        rows.append(f"data/store/t/volumes/ser_{i:016x}.npy,ser_{i:016x},pat_{i:016x},{ich[i]},{sdh[i]}\n")
    write_store(root / "data/store/t", volumes, {s: f"pat_{s[4:]}" for s in volumes}, spec)
    splits = root / "data/splits/t"
    splits.mkdir(parents=True)
    bounds = {"train": (0, N_TRAIN), "val": (N_TRAIN, N_TRAIN + N_VAL), "test": (N_TRAIN + N_VAL, n)}
    for name, (lo, hi) in bounds.items():
        (splits / f"{name}.csv").write_text("img_path,scan_id,patient_id,ICH,SDH\n" + "".join(rows[lo:hi]))
    (splits / "split.json").write_text(json.dumps({"store": "data/store/t", "seed": 0}))
    torch.manual_seed(0)
    save_model_dir(root / "models/mae", build_encoder(TINY_ARCH),
                   {"preprocess": {**spec.model_dump(mode="json"), "version": spec.version}, "windows": WINDOWS,
                    "method": "mae", "provenance": {}})
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, mlflow_store: str) -> tuple[Path, dict, str]:
    """The real `headct finetune` job on the separable project, registering the classifier."""
    from headct.config import TrackingConfig
    from pipelines.finetune import run

    root = make_separable_project(tmp_path_factory.mktemp("gate"))
    ctx = JobContext(root=root, tracking=TrackingConfig(uri=mlflow_store, experiment="validation-gate"))
    out = run(finetune_cfg(root, epochs=4, batch_size=8, bootstrap=200, register_as="gate-classifier"), ctx)
    return root, out, mlflow_store


@pytest.fixture(scope="module")
def chance_classifier(trained: tuple[Path, dict, str]) -> Path:
    """A classifier at chance: an untrained network, whose scores are independent of the labels, validated on the
    same val set through the library (the figures `headct finetune` records)."""
    import pandas as pd

    from headct.eval.metrics import evaluate_binary, youden_threshold
    from headct.eval.validation_gate import performance_record
    from headct.models.classifier_dir import predict_proba, save_classifier
    from headct.models.heads import Classifier
    from headct.models.vit import build_encoder

    root = trained[0]
    val = pd.read_csv(root / "data/splits/t/val.csv")
    torch.manual_seed(1)
    network = Classifier(build_encoder(TINY_ARCH), "mean", 2).eval()
    network.windows = WINDOWS
    probs = predict_proba(network, np.stack([np.load(root / p) for p in val["img_path"]]))
    thresholds, figures = {}, {}
    rng = np.random.default_rng(7)
    for j, label in enumerate(("ICH", "SDH")):
        y = rng.permutation(val[label].to_numpy())  # labels the network's scores know nothing of
        thresholds[label] = youden_threshold(y, probs[:, j])
        figures[label] = evaluate_binary(y, probs[:, j], val["patient_id"].to_numpy(), thresholds[label], 200, 0)
    config = json.loads((root / "models/classifier/config.json").read_text())
    save_classifier(root / "models/chance", network, {
        "labels": ["ICH", "SDH"], "thresholds": thresholds, "windows": WINDOWS, "preprocess": config["preprocess"],
        "performance": performance_record(figures, None, 200)})
    return root / "models/chance"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("study")
    write_series(folder / "axial", SeriesSpec(), study_uid="1.2.826.0.1.3680043.8.498.15",
                 patient_id="PID-GATE-15", patient_name="Gate^Secret")
    return folder


def predict_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, study: Path, classifier: Path,
                *settings: str) -> tuple[str, dict]:
    """`headct predict STUDY --classifier DIR --set predict.out=...` through the Typer app -> (terminal, JSON)."""
    from typer.testing import CliRunner

    import cli

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "predict.json"
    args = ["predict", str(study), "--classifier", str(classifier), "--set", f"predict.out={out}",
            "--set", "predict.device=cpu", *[a for s in settings for a in ("--set", s)]]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for secret in ("PID-GATE-15", "Gate^Secret", "1.2.826.0.1.3680043.8.498.15", str(study)):
        assert secret not in text
    return result.output, json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON token {c}"))


def test_config_records_val_and_test_figures_per_label(trained: tuple[Path, dict, str]) -> None:
    root, out, _ = trained
    config = json.loads((root / "models/classifier/config.json").read_text())
    record = config["performance"]
    assert record["bootstrap"] == 200 and set(record["labels"]) == {"ICH", "SDH"}
    for label, entry in record["labels"].items():
        val, test = entry["val"], entry["test"]
        assert (val["n_pos"], val["n_pos"] + val["n_neg"]) == (24, N_VAL) if label == "ICH" else val["n_pos"] > 0
        assert val["threshold"] == pytest.approx(config["thresholds"][label])
        assert test["threshold"] == val["threshold"] and test["n_pos"] + test["n_neg"] == N_TEST
        for split in (val, test):
            for m in ("auroc", "sensitivity", "specificity"):
                assert split[f"{m}_low"] <= split[m] <= split[f"{m}_high"]
    metrics = json.loads((root / "reports/finetune/metrics.json").read_text())
    assert record["labels"]["ICH"]["test"]["auroc"] == pytest.approx(metrics["labels"]["ICH"]["auroc"])
    assert record["labels"]["ICH"]["val"]["auroc_low"] > 0.7  # separable: the gate's default floor is passed
    assert record["labels"]["SDH"]["val"]["auroc_low"] < 0.7  # coin flips: an interval reaching down to chance
    assert out["validated_labels"] == ["ICH"]


def test_separable_label_decides_through_the_cli_and_the_noise_label_does_not(
    trained: tuple[Path, dict, str], study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = trained[0]
    terminal, out = predict_cli(tmp_path, monkeypatch, study, root / "models/classifier")
    (result,) = out["results"]
    ich, sdh = result["findings"]["ICH"], result["findings"]["SDH"]
    assert ich["validated"] and ich["positive"] is (ich["probability"] >= ich["threshold"])
    assert ich["validation"]["auroc_low"] > 0.7 and ich["validation"]["n_pos"] == 24
    assert not sdh["validated"] and sdh["positive"] is None and "not above 0.7" in sdh["not_validated_because"]
    assert out["gate"] == {"min_auroc_low": 0.7, "min_val_positives": 20, "validated_labels": ["ICH"]}
    assert "study" not in out and "No finding" not in terminal
    assert "not validated (val AUROC" in terminal and ("positive" in terminal or "negative" in terminal)
    # A stricter setting of the gate takes the decision away too.
    terminal, out = predict_cli(tmp_path, monkeypatch, study, root / "models/classifier",
                                "predict.min_val_positives=25")
    assert out["results"][0]["findings"]["ICH"]["positive"] is None
    assert "24 val positives, fewer than 25" in terminal
    assert terminal.lstrip().startswith("No finding of this classifier is validated")


def test_classifier_at_chance_validates_nothing_and_decides_nothing(
    chance_classifier: Path, study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    terminal, out = predict_cli(tmp_path, monkeypatch, study, chance_classifier)
    assert terminal.lstrip().startswith("No finding of this classifier is validated")
    assert "positive" not in terminal.replace("positives", "") and "negative" not in terminal
    findings = out["results"][0]["findings"]
    assert all(f["positive"] is None and f["validated"] is False for f in findings.values())
    assert out["gate"]["validated_labels"] == []
    assert all(f["validation"]["auroc_low"] < 0.7 for f in findings.values())


def test_an_old_classifier_without_a_record_loads_and_is_not_validated(
    trained: tuple[Path, dict, str], study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import headct

    old = tmp_path / "old"
    shutil.copytree(trained[0] / "models/classifier", old)
    config = json.loads((old / "config.json").read_text())
    del config["performance"]
    (old / "config.json").write_text(json.dumps(config))
    terminal, out = predict_cli(tmp_path, monkeypatch, study, old)
    assert "No finding of this classifier is validated" in terminal and "re-run `headct finetune`" in terminal
    assert all(f["positive"] is None and f["validation"] is None
               for f in out["results"][0]["findings"].values())
    clf = headct.load_classifier(old)
    assert clf.validated_labels == [] and clf.verdicts["ICH"].reason == NO_RECORD
    with pytest.raises(UnvalidatedLabelError, match="ICH: not validated"):
        clf.decisions(np.array([[0.9, 0.1]]))


def test_decisions_refuse_unvalidated_labels_unless_overridden(trained: tuple[Path, dict, str]) -> None:
    import headct

    root = trained[0]
    clf = headct.load_classifier(root / "models/classifier")
    assert clf.validated_labels == ["ICH"]
    volumes = np.stack([np.load(p) for p in sorted((root / "data/store/t/volumes").glob("*.npy"))[:4]])
    probs = clf.predict_proba(volumes)
    with pytest.raises(UnvalidatedLabelError, match=r"SDH: not validated \(val AUROC 0\.\d+ \[") as err:
        clf.decisions(probs)
    assert "allow_unvalidated=True" in str(err.value) and "ICH:" not in str(err.value)
    decided = clf.decisions(probs, labels=clf.validated_labels)
    assert list(decided) == ["ICH"] and (decided["ICH"] == (probs[:, 0] >= clf.thresholds["ICH"])).all()
    both = clf.decisions(probs, allow_unvalidated=True)
    assert (both["SDH"] == (probs[:, 1] >= clf.thresholds["SDH"])).all()
    # The gate's settings are the caller's too: more val positives than val held leaves nothing to decide.
    strict = headct.load_classifier(root / "models/classifier", min_val_positives=25)
    with pytest.raises(UnvalidatedLabelError, match="ICH: .*24 val positives, fewer than 25"):
        strict.decisions(probs, labels=["ICH"])
    with pytest.raises(InputError, match="unknown label"):
        clf.decisions(probs, labels=["EDH"])


def test_model_version_description_carries_the_gate(trained: tuple[Path, dict, str]) -> None:
    import mlflow

    root, out, uri = trained
    assert out["registered"]["name"] == "gate-classifier"
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version("gate-classifier", out["registered"]["version"])
    assert "Validated (decisions allowed): ICH (val AUROC" in version.description
    assert "Not validated (probabilities only): SDH (val AUROC" in version.description
    assert version.tags["validated_labels"] == "ICH"
    mlflow.set_tracking_uri(uri)
    volumes = np.stack([np.load(p) for p in sorted((root / "data/store/t/volumes").glob("*.npy"))[:2]])
    served = mlflow.pyfunc.load_model(f"models:/gate-classifier/{version.version}").predict(volumes)
    import headct

    assert np.allclose(served, headct.load_classifier(root / "models/classifier").predict_proba(volumes), atol=1e-6)


def test_the_rule_reads_the_interval_and_the_positives() -> None:
    def config(low: float | None, n_pos: int) -> dict:
        val = {"auroc": 0.9, "auroc_low": low, "auroc_high": 0.97, "n_pos": n_pos, "n_neg": 30}
        return {"labels": ["ICH"], "performance": {"labels": {"ICH": {"val": val}}}}

    rule = GateRule(0.7, 20)
    assert judge(config(0.71, 20), rule)["ICH"].validated
    assert not judge(config(0.70, 20), rule)["ICH"].validated  # the interval must lie above the floor
    assert "19 val positives" in judge(config(0.9, 19), rule)["ICH"].reason
    assert "no confidence interval" in judge(config(None, 40), rule)["ICH"].reason
    assert judge(config(0.9, 19), GateRule(0.7, 10))["ICH"].validated
    assert judge({"labels": ["ICH"], "performance": {"labels": {}}}, rule)["ICH"].status() == (
        "not validated (no val figures recorded)")
    with pytest.raises(InputError, match="x/config.json: `performance` must be an object"):
        judge({"labels": ["ICH"], "performance": [1]}, rule, "x/config.json")


def test_docs_contracts_name_the_recorded_figures_and_the_predict_json_keys(
    trained: tuple[Path, dict, str], study: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    from headct.eval.validation_gate import FIGURES
    from tests.conftest import REPO

    text = (REPO / "docs/contracts.md").read_text()
    documented = re.search(r"FIGURES = \{([^}]*)\}", text).group(1)
    assert {k.strip() for k in documented.split(",")} == set(FIGURES)
    _, out = predict_cli(tmp_path, monkeypatch, study, trained[0] / "models/classifier")
    schema = text[text.index("`headct predict STUDY"):text.index("## Ingest reason codes")]
    finding_keys = {k for f in out["results"][0]["findings"].values() for k in f}
    for key in {*out, *out["classifier"], *out["gate"], *out["results"][0], *finding_keys}:
        assert f'"{key}"' in schema, key
