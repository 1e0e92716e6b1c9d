"""Job `headct ingest`: a folder of DICOM series and NIfTI files -> the canonical volume store; and
`headct ingest merge`, which joins the shards of a `--shard K/N` job array.

Outputs: under `cfg.dest` volumes/, manifest.parquet, rejects.csv, labels.csv, preprocess.json (a shard: its
tables under DEST/shards/<K>of<N>/), nifti/ with `export_nifti`, meta.csv when SRC holds the generator's
truth.csv; the local linkage file (`cfg.linkage`, default `<root>/private/linkage/<dest name>.csv`, never
logged); `<cfg.report_dir>/metrics.json` (counts, for DVC) and `<cfg.report_dir>/contact_sheet.png` (three
planes of up to `contact_sheet_volumes` accepted volumes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from headct.config.base import JobContext
from headct.config.data import IngestConfig

QC_WINDOW = (40.0, 80.0)  # brain window, level/width HU
CONTACT_SHEET = "contact_sheet.png"


def write_contact_sheet(store_dir: Path, rows: list[dict[str, Any]], dest: Path) -> Path:
    """Axial, coronal and sagittal mid-planes of each volume in `rows`, brain window, radiological view
    (patient's right on the image's left, anterior up in axial, superior up in coronal/sagittal), labelled by
    scan pseudonym only."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from headct.data.store import read_volume
    from headct.io import atomic_path

    level, width = QC_WINDOW
    fig = Figure(figsize=(7.5, 2.5 * max(1, len(rows))), dpi=80)
    FigureCanvasAgg(fig)
    for i, row in enumerate(rows):
        vol = read_volume(store_dir, row["volume"]).astype(np.float32)  # (x, y, z), x toward patient Right
        x, y, z = (s // 2 for s in vol.shape)
        planes = {
            "axial": vol[::-1, :, z].T,  # columns: patient right -> left; rows: posterior -> anterior
            "coronal": vol[::-1, y, :].T,
            "sagittal": vol[x, :, :].T,  # columns: posterior -> anterior
        }
        for j, (name, plane) in enumerate(planes.items()):
            ax = fig.add_subplot(len(rows), 3, 3 * i + j + 1)
            ax.imshow(plane, cmap="gray", origin="lower", vmin=level - width / 2, vmax=level + width / 2)
            ax.set_title(f"{row['scan_id']} {name}" if j == 0 else name, fontsize=7)
            ax.set_axis_off()
            if name != "sagittal":
                ax.text(0.02, 0.5, "R", color="yellow", fontsize=7, transform=ax.transAxes)
    if not rows:
        fig.text(0.5, 0.5, "no accepted volume", ha="center")
    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png")
    return dest


def loggable_params(cfg: IngestConfig, root: Path) -> dict[str, Any]:
    """The config for MLflow, every path (SRC, DEST, labels, linkage, reports) labelled by
    `tracking.path_label`: relative to the project root when its folder names are plain lowercase words, else
    a hash: an ad hoc SRC or DEST is often named after the patient or the export."""
    from headct.tracking import flatten_params

    return flatten_params(cfg, root=root)


_TABLE_ROWS = ("studies_seen", "series_seen", "accepted", "converted", "reused", "duplicates", "series_broken",
               "files_dicom", "files_nifti", "files_dicomdir", "files_repeated", "files_unreadable",
               "folders_unreadable", "unlabelled_scans",
               "label_keys_unmatched", "label_rows_duplicated", "label_values_conflicting", "label_scans_partial",
               "shards", "duplicates_across_shards")


def _print_table(summary: dict[str, Any], title: str = "ingest") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("", style="bold")
    table.add_column("count", justify="right")
    for key in _TABLE_ROWS:
        if key in summary:
            table.add_row(key.replace("_", " "), str(summary[key]))
    for reason, n in summary["rejected"].items():
        table.add_row(f"rejected: {reason}", str(n))
    if "seconds" in summary:
        table.add_row("seconds", str(summary["seconds"]))
    Console().print(table)


def _log(cfg: IngestConfig, ctx: JobContext, summary: dict[str, Any], artifacts: list[Path], job: str) -> None:
    from headct import tracking

    with tracking.job_run(ctx.tracking, job, loggable_params(cfg, ctx.root), ctx.root) as mlrun:
        counts = {k: v for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        counts.update({f"rejected.{reason}": n for reason, n in summary["rejected"].items()})
        mlrun.log_metrics(counts)
        for path in artifacts:
            if path.is_file():
                mlrun.log_artifact(path, "ingest")


def run(cfg: IngestConfig, ctx: JobContext) -> dict[str, Any]:
    from rich.console import Console

    from headct.data.guards import verdict, writable_folder
    from headct.data.ingest import ingest
    from headct.data.shards import SHARDS
    from headct.data.store import MANIFEST, REJECTS
    from headct.data.store_meta import write_store_meta
    from headct.errors import InputError
    from headct.headline import write_stage_headline
    from headct.io import write_json

    tables = cfg.dest / SHARDS / cfg.shard.replace("/", "of") if cfg.shard else cfg.dest
    report_dir = tables / "reports" if cfg.shard else cfg.report_dir  # shards never share a report file
    if not cfg.shard:  # a shard's report folder lies in DEST, which ingest checks
        writable_folder(report_dir, "ingest report folder")  # before any work, not after the store is written
    result = ingest(cfg, ctx.root, Console(stderr=True))
    write_store_meta(cfg, ctx.root)  # the generator's truth.csv, if any -> DEST/meta.csv (pseudonymous)
    summary = result.summary
    metrics_path = report_dir / "metrics.json"
    write_json(metrics_path, summary)
    write_stage_headline(report_dir, "ingest", summary)  # the DVC metric: a few numbers of it
    sheet = write_contact_sheet(cfg.dest, result.manifest_rows[: cfg.contact_sheet_volumes],
                                report_dir / CONTACT_SHEET)
    _log(cfg, ctx, summary, [tables / MANIFEST, tables / REJECTS, metrics_path, sheet], "ingest")
    _print_table(summary)
    failed = verdict(summary, cfg.max_reject_fraction)
    if failed:  # the store and reports stay (they say why); the exit code tells DVC and scripts
        raise InputError(failed)
    return summary


def run_merge(cfg: IngestConfig, ctx: JobContext, stores: list[Path]) -> dict[str, Any]:
    """Join the shards under `stores` into `stores[0]` and write the same reports as a whole run."""
    from headct.data.ingest import merge
    from headct.data.store import MANIFEST, REJECTS, read_manifest
    from headct.data.store_meta import write_store_meta
    from headct.headline import write_stage_headline
    from headct.io import write_json

    summary = merge(cfg, stores, ctx.root)
    cfg = cfg.model_copy(update={"dest": stores[0]})
    write_store_meta(cfg, ctx.root)
    metrics_path = cfg.report_dir / "metrics.json"
    write_json(metrics_path, summary)
    write_stage_headline(cfg.report_dir, "ingest", summary)
    rows = read_manifest(cfg.dest).head(cfg.contact_sheet_volumes).to_dict("records")
    sheet = write_contact_sheet(cfg.dest, rows, cfg.report_dir / CONTACT_SHEET)
    _log(cfg, ctx, summary, [cfg.dest / MANIFEST, cfg.dest / REJECTS, metrics_path, sheet], "ingest-merge")
    _print_table(summary, "ingest merge")
    return summary
