"""The discovery benchmark (benchmarks/discovery.py) at toy size: it writes its flat RSNA-style folder, reads it
back with ingest's discovery and the RSNA labels reader, and reports what it says it does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_discovery_benchmark_smoke(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks/discovery.py"), "--files", "90", "--traced", "30",
                          "--slices-per-exam", "30", "--data", str(tmp_path / "data")],
                         capture_output=True, text=True, check=False, cwd=REPO, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "warn" not in out.stderr.lower()  # the anonymised `ID_` identifiers are written without noise
    result = json.loads((tmp_path / "data" / "discovery.json").read_text())
    found = result["discovery"]
    assert found["files"] == found["headers"] == 90 and found["series"] == 3  # every file read, exams reassembled
    assert found["traced_files"] == 30 and found["bytes_per_file_held"] > 0
    assert result["labels"]["rows"] == 6 * 90 and result["labels"]["slices"] == 90
    assert len(list((tmp_path / "data" / "stage_2_train").iterdir())) == 90  # one flat folder
    assert "files/s" in out.stdout and "rows/s" in out.stdout
