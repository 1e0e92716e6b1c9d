"""End to end: the real `dvc repro` of the whole chain on tiny parameters, in a temporary workspace.

Then: a second `dvc repro` runs nothing; changing a probe parameter re-runs only probe and report; and every file
the chain produced (parquet, SQLite, gzip, CSV/JSON, MLflow artifacts, images) is searched for the identifying
values planted in the raw DICOM headers and for raw UIDs and source paths: zero hits allowed.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import workspace  # noqa: E402

# Not searched: the raw input (holds the values by design) and the local linkage file (the one place allowed
# to map pseudonyms back to sources); the copied source code is not output either.
NOT_OUTPUT = ("data/raw", "private", "headct", "pipelines", "cli.py", "dvc.yaml", "params.yaml", ".dvcignore")


def planted_values(raw: Path) -> tuple[set[str], set[str]]:
    """Identifying header values and UIDs of every raw DICOM file (read with pydicom, not trusted from synth)."""
    import pydicom

    ident: set[str] = set()
    uids: set[str] = set()
    for path in raw.rglob("*"):
        if not path.is_file() or path.suffix in {".csv", ".json", ".png"}:
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            value = str(ds.get(key, "") or "").strip()
            if value:
                ident.add(value)
        for key in ("StudyInstanceUID", "SeriesInstanceUID"):
            uids.add(str(ds[key].value))
    return ident, uids


def decoded_texts(path: Path) -> list[str]:
    """The file's raw bytes as text, plus its decoded content where the format hides text from a byte grep."""
    data = path.read_bytes()
    texts = [data.decode("latin-1")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        texts.append(pq.read_table(path).to_pandas().to_csv())
        texts.append(json.dumps({k.decode(): v.decode("latin-1") for k, v in (pq.read_metadata(path).metadata or {}).items()}))
    elif path.suffix == ".gz" or data[:2] == b"\x1f\x8b":
        texts.append(gzip.decompress(data).decode("latin-1"))
    elif data[:16] == b"SQLite format 3\x00":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                rows = db.execute(f'SELECT * FROM "{table}"').fetchall()  # noqa: S608 (names from the DB)
                texts.append(repr(rows))
    elif path.suffix == ".png":
        from PIL import Image

        with Image.open(path) as img:
            texts.append(repr(img.info))
    return texts


def produced_files(ws: Path) -> list[Path]:
    files = []
    for path in ws.rglob("*"):
        rel = path.relative_to(ws).as_posix()
        if path.is_file() and not any(rel == n or rel.startswith(n + "/") for n in NOT_OUTPUT):
            files.append(path)
    return files


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ws = workspace.make_workspace(tmp_path_factory.mktemp("e2e") / "ws", REPO / "params-quick.yaml")
    result = workspace.repro(ws)
    assert result.returncode == 0, "dvc repro failed"
    return ws


def test_chain_produces_every_stage_output(chain: Path) -> None:
    for rel in (
        "data/raw/synth/reads.csv",
        "data/store/synth/manifest.parquet",
        "data/store/synth/labels.csv",
        "data/splits/synth/train.csv",
        "models/mae/config.json",
        "models/mae/model.safetensors",
        "reports/probe/predictions.csv",
        "reports/report/results.md",
        "mlflow.db",
    ):
        assert (chain / rel).is_file(), rel
    metrics = json.loads((chain / "reports/pretrain/metrics.json").read_text())
    assert metrics["heldout_loss_end"] < metrics["heldout_loss_start"]  # pre-training learned something
    # The report's probe table gives, for every probed label and model, the probe's own test AUROC.
    probe = json.loads((chain / "reports/probe/metrics.json").read_text())
    models = [m for m in probe if m != "skipped"]
    lines = (chain / "reports/report/results.md").read_text().splitlines()
    start = lines.index("## Linear probe (frozen features, test split)")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("| label |"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    columns = [c.strip() for c in lines[first].strip("|").split("|")]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in lines[first + 2:end])}
    assert set(rows) == set(probe[models[0]]) and rows  # every probed label, no other
    method = json.loads((chain / "reports/pretrain/metrics.json").read_text())["method"].upper()  # the profile's
    names = {"pretrained": f"AUROC pre-trained {method}", "random_init": "AUROC random init",
             "hu_histogram": "AUROC HU histogram"}
    assert "pretrained.residual.b-1" in models  # the quick profile's mim encoder is read out by its residual too
    for model in [m for m in models if m in names]:
        column = columns.index(names[model])
        for label, cells in rows.items():
            assert cells[column].split()[0] == f"{probe[model][label]['auroc']:.3f}", (model, label, cells)
    # every job is one MLflow run, read through MLflow's client (not its private tables)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{chain / 'mlflow.db'}")
    experiments = client.search_experiments()
    runs = client.search_runs([e.experiment_id for e in experiments], max_results=1000)
    jobs = {r.data.tags.get("headct.job") for r in runs if r.info.status == "FINISHED"}
    assert {"synth", "ingest", "split", "pretrain", "extract", "probe", "fewshot", "retrieval", "report"} <= jobs


def test_dvc_metrics_are_the_stage_headlines_and_fit_a_terminal(chain: Path) -> None:
    """`dvc metrics show` reads only headline.json files (at most MAX_VALUES numbers in all); metrics.json files stay
    the full record the report reads."""
    import subprocess

    from headct.headline import BUDGET, MAX_VALUES, count_values

    out = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=chain, env=workspace.dvc_env(),
                         capture_output=True, text=True, check=True)
    (workspace_revision,) = json.loads(out.stdout).values()  # one revision, the workspace (DVC keys it "")
    files = workspace_revision["data"]
    assert set(files) == {f"reports/{stage}/headline.json" for stage in BUDGET}, sorted(files)
    values = {path: count_values(entry["data"]) for path, entry in files.items()}
    assert 0 < sum(values.values()) <= MAX_VALUES, values
    pretrain = json.loads((chain / "reports/pretrain/metrics.json").read_text())
    assert files["reports/pretrain/headline.json"]["data"]["heldout_loss_end"] == round(
        pretrain["heldout_loss_end"], 6)
    table = subprocess.run(["dvc", "metrics", "show"], cwd=chain, env=workspace.dvc_env(), capture_output=True,
                           text=True, check=True).stdout
    assert max(len(line) for line in table.splitlines()) < 2000  # was ~6,300 columns with every metrics.json


def test_second_repro_runs_nothing_and_probe_change_reruns_only_downstream(chain: Path) -> None:
    import subprocess

    out = subprocess.run(
        ["dvc", "repro"], cwd=chain, env=workspace.dvc_env(), capture_output=True, text=True, check=True
    )
    assert "Running stage" not in out.stdout, out.stdout

    params = yaml.safe_load((chain / "params.yaml").read_text())
    params["probe"]["bootstrap"] = int(params["probe"].get("bootstrap", 50)) + 10
    (chain / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run(
        ["dvc", "repro"], cwd=chain, env=workspace.dvc_env(), capture_output=True, text=True, check=True
    )
    ran = {line.split("'")[1] for line in out.stdout.splitlines() if line.startswith("Running stage")}
    # probe re-runs; report re-runs only if the probe's metrics changed (DVC compares hashes): nothing upstream.
    assert "probe" in ran and ran <= {"probe", "report"}, out.stdout


def test_no_identifying_value_or_uid_in_any_output(chain: Path) -> None:
    ident, uids = planted_values(chain / "data/raw/synth")
    assert len(ident) >= 5 * 10  # five identifying fields per study, tiny set of studies
    assert all(len(v) >= 8 for v in ident)
    series_dirs = {
        p.parent.relative_to(chain / "data/raw/synth").as_posix()
        for p in (chain / "data/raw/synth").rglob("*")
        if p.is_file() and p.suffix not in {".csv", ".json", ".png"}
    }
    needles = ident | uids | series_dirs
    files = produced_files(chain)
    assert any(f.name == "mlflow.db" for f in files)
    assert any("mlartifacts" in f.parts for f in files)
    # A birth date is 8 digits: match it as a whole number, not inside a longer one (timestamps, floats).
    patterns = {n: re.compile(rf"(?<!\d){re.escape(n)}(?!\d)") if n.isdigit() else None for n in needles}
    hits = []
    for path in files:
        for text in decoded_texts(path):
            for needle, pattern in patterns.items():
                if (pattern.search(text) if pattern else needle in text):
                    hits.append(f"{path.relative_to(chain)}: {needle}")
    assert not hits, hits[:20]
