"""`headct`: the command line. Reads params.yaml + `--set` overrides, validates, calls one job.

Shape (DESIGN.md): ``headct <job> [PATHS...] [--params FILE] [--set section.key=value ...]``.
Only typer, pydantic and yaml are imported at start-up; each job's heavy imports happen inside the job, so
``headct --help`` is instant. Exit codes: 0 ok, 1 bad input found while working, 2 bad configuration, 75 stopped by
SIGTERM/SIGUSR1 after writing a checkpoint (pretrain, finetune, ceiling, tune; requeued when under Slurm: run the
same command again to resume; headct/train/preemption.py).
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from headct.config import (
    ConfigError,
    JobContext,
    Params,
    format_validation_error,
    load_params,
    with_absolute_paths,
)
from headct.errors import InputError

app = typer.Typer(
    name="headct",
    help="Head-CT foundation models: synthesise, ingest, split, pre-train (MAE or DINO), evaluate (probe, "
         "few-shot, retrieval, compare), tune and fine-tune, explain, predict, report. Every job ends by printing "
         "where its outputs went and its MLflow run id.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the resolved configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
import_app = typer.Typer(help="Convert another project's checkpoint into a headct model directory.",
                         no_args_is_help=True)
app.add_typer(import_app, name="import-weights")
tracking_app = typer.Typer(help="MLflow tracking: upload runs logged offline.", no_args_is_help=True)
app.add_typer(tracking_app, name="tracking")
splits_app = typer.Typer(help="Convert another project's published split files into headct split files.",
                         no_args_is_help=True)
app.add_typer(splits_app, name="import-splits")

ParamsOpt = Annotated[
    Path | None, typer.Option("--params", help="Params file (default: <project root>/params.yaml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one value: section.key=value (YAML value). Repeatable."),
]


# The config fields naming what each job writes (the rest of its paths are inputs), for the closing lines.
OUTPUT_FIELDS = {
    "synth": ("out", "montage"), "ingest": ("dest", "report_dir"), "split": ("out", "report_dir"),
    "pretrain": ("model_dir", "report_dir"), "extract": ("out",), "probe": ("report_dir",),
    "fewshot": ("report_dir",), "retrieval": ("report_dir",), "compare": ("report_dir",),
    "tune": ("best_params", "report_dir"), "finetune": ("out_dir", "report_dir"), "ceiling": ("out_dir", "report_dir"),
    "explain": ("report_dir",),
    "report": ("report_dir",), "predict": ("out",),
}


def _version(value: bool) -> None:
    if value:
        from headct import __version__

        typer.echo(f"headct {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Head-CT foundation models (see `headct --help`)."""


def _shown(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def _print_outcome(job: str, section: Any, root: Path, outputs: list[Path]) -> None:
    """The closing lines of every job: where its outputs went and its MLflow run (id, name, experiment, store)."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 alone writes outputs and logs the run
        return
    from headct import tracking

    fields = ("dest",) if job == "ingest" and getattr(section, "shard", "") else OUTPUT_FIELDS.get(job, ())
    paths = [*outputs, *(getattr(section, f) for f in fields if getattr(section, f, None))]  # a shard: all in DEST
    shown = list(dict.fromkeys(_shown(Path(p), root) for p in paths))
    typer.echo(f"headct {job}: outputs in {', '.join(shown) if shown else 'none (terminal only)'}")
    run = tracking.LAST_RUN
    if run:
        typer.echo(f"headct {job}: MLflow run {run['run_id']} ({run['name']!r}, experiment {run['experiment']!r}, "
                   f"{run['uri']})")
    else:
        typer.echo(f"headct {job}: no MLflow run")


def _fail(message: str, code: int) -> typer.Exit:
    typer.secho(message, fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _resolve(params_file: Path | None, overrides: list[str] | None) -> tuple[Params, Path]:
    try:
        return load_params(params_file, overrides or [])
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _run_job(
    job: str,
    params_file: Path | None,
    overrides: list[str] | None,
    positional: dict[str, Any] | None = None,
    also: tuple[str, ...] = (),
    runner: str = "run",
    extra: list[Any] | None = None,
    section_name: str | None = None,
) -> Any:
    """Validate everything, then import `pipelines.<job>` and call its `runner`(cfg, ctx[, extra]) with the params
    section `section_name` (default: the job's own); sections named in `also` are passed as keyword arguments
    (e.g. tune gets the finetune section its trials start from)."""
    params, root = _resolve(params_file, overrides)
    section = getattr(params, section_name or job)
    updates = positional or {}
    if updates:
        try:  # re-validate: positional paths obey the same rules as params.yaml values
            section = type(section).model_validate({**section.model_dump(), **updates})
        except ValidationError as exc:
            raise _fail(format_validation_error(exc, "command-line arguments"), 2) from None
    section = with_absolute_paths(section, root)
    from headct import tracking_sync

    tracking_cfg = tracking_sync.effective(params.tracking, root)  # tracking.offline: the local store
    if job != "slurm" and not tracking_cfg.offline:  # a server that does not answer stops the job before any work
        from headct.tracking import TrackingUnreachableError, check_reachable

        try:
            check_reachable(tracking_cfg, root)
        except TrackingUnreachableError as exc:
            raise _fail(f"headct {section_name or job}: {exc}", 1) from None
    ctx = JobContext(root=root, tracking=tracking_cfg)
    sections = {name: with_absolute_paths(getattr(params, name), root) for name in also}
    module = importlib.import_module(f"pipelines.{job}")
    from headct import tracking
    from headct.train.preemption import EXIT_CODE, Preempted, requeue

    tracking.LAST_RUN.clear()  # so the closing line names this job's run, or none
    try:
        result = getattr(module, runner)(section, ctx, *([] if extra is None else [extra]), **sections)
    except Preempted as exc:  # the checkpoint is on disk: hand the node back and come again
        typer.echo(f"headct {section_name or job}: {exc}; {requeue()}")
        raise typer.Exit(EXIT_CODE) from None
    except ConfigError as exc:  # a setting only the job can check (e.g. a label source's name)
        raise _fail(f"headct {section_name or job}: {exc}", 2) from None
    except InputError as exc:
        raise _fail(f"headct {section_name or job}: {exc}", 1) from None
    merged_into = [extra[0]] if runner == "run_merge" and extra else []
    if job == "slurm":  # submitted, not run: the jobs print their own closing lines
        return result  # `ingest merge DEST ...` writes DEST
    _print_outcome(section_name or job, section, root, merged_into)
    return result


@config_app.command("show")
def config_show(
    section: Annotated[str | None, typer.Argument(help="Only this section (e.g. pretrain).")] = None,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Print the resolved configuration (defaults < params.yaml < --set) as YAML."""
    params, root = _resolve(params_file, overrides)
    tree = params.model_dump(mode="json")
    if section is not None:
        if section not in tree:
            raise _fail(f"unknown section {section!r}; sections: {', '.join(tree)}", 2)
        tree = {section: tree[section]}
    typer.echo(f"# project root: {root}")
    typer.echo(yaml.safe_dump(tree, sort_keys=False).rstrip())


@tracking_app.command("sync")
def tracking_sync_cmd(
    src: Annotated[str | None, typer.Argument(help="Store holding the runs (default: the offline store, "
                                                   "tracking.offline_uri or sqlite:///<root>/mlflow-offline.db).")]
    = None,
    dst: Annotated[str | None, typer.Argument(help="Store to upload to (default: tracking.uri, e.g. "
                                                   "http://mlflow.example.org:5000).")] = None,
    experiment: Annotated[list[str] | None, typer.Option("--experiment", help="Only this experiment. Repeatable.")]
    = None,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Copy every finished run of SRC into DST once (params, metric histories, artifacts, nested runs); running it
    again copies nothing twice."""
    from headct import tracking
    from headct.tracking_sync import offline_uri, sync

    params, root = _resolve(params_file, overrides)
    src = src or offline_uri(params.tracking, root)
    online = params.tracking.model_copy(update={"offline": False})
    dst = dst or tracking.tracking_uri(online, root)
    try:
        tracking.check_reachable(online.model_copy(update={"uri": dst}), root)
        counts = sync(src, dst, experiment)
    except (tracking.TrackingUnreachableError, ValueError) as exc:
        raise _fail(f"headct tracking sync: {exc}", 1) from None
    typer.echo(f"headct tracking sync {tracking.redact(src)} -> {tracking.redact(dst)}: {counts['copied']} run(s) "
               f"copied, {counts['already']} already there, {counts['redone']} partial copies redone, "
               f"{counts['unfinished']} still running (left for later), {counts['experiments']} experiment(s)")


@import_app.command("fm-hct")
def import_fm_hct(
    src: Annotated[Path, typer.Argument(help="FM-HCT checkpoint (model_weights.pth, or a dict with state_dict).")],
    dest: Annotated[Path, typer.Argument(help="New model directory, e.g. models/fm-hct.")],
    num_heads: Annotated[int, typer.Option(help="Attention heads (not stored in the weights; FM-HCT: 12).")] = 12,
    img_size: Annotated[int | None, typer.Option(help="Cube edge in voxels (default: from the position table).")]
    = None,
) -> None:
    """FM-HCT's MONAI-style ViT -> a headct model directory (strict: every tensor mapped and shape-checked),
    recording FM-HCT's preprocessing (96^3 crop-and-stretch) and windows."""
    import json

    from headct.models.import_fmhct import import_fmhct

    try:
        summary = import_fmhct(src, dest, num_heads=num_heads, img_size=img_size)
    except InputError as exc:
        raise _fail(f"headct import-weights fm-hct: {exc}", 1) from None
    typer.echo(json.dumps(summary, indent=1))


@splits_app.command("fm-hct")
def import_fm_hct_splits(
    store: Annotated[Path, typer.Argument(help="The store the splits are over (ingested from the same dataset).")],
    out: Annotated[Path, typer.Argument(help="Folder for train/val/test.csv and split.json.")],
    train: Annotated[Path, typer.Option(help="FM-HCT's train CSV.")],
    val: Annotated[Path, typer.Option(help="FM-HCT's validation CSV.")],
    test: Annotated[Path, typer.Option(help="FM-HCT's test CSV.")],
    linkage: Annotated[Path | None, typer.Option(help="The store's linkage file (default: "
                                                      "<project root>/private/linkage/<store name>.csv).")] = None,
) -> None:
    """FM-HCT's split files -> headct split files over STORE, matched through the local linkage file (pseudonyms
    only; unmatched rows reported by count)."""
    import json

    from headct.config import find_project_root
    from headct.data.fmhct_splits import import_fmhct_splits

    root = find_project_root()
    store, out = store.resolve(), out.resolve()
    linkage = linkage.resolve() if linkage is not None else root / "private" / "linkage" / f"{store.name}.csv"
    files = {"train": train.resolve(), "val": val.resolve(), "test": test.resolve()}
    try:
        summary = import_fmhct_splits(files, store, linkage, out, root)
    except InputError as exc:
        raise _fail(f"headct import-splits fm-hct: {exc}", 1) from None
    typer.echo(json.dumps({k: summary[k] for k in summary if k != "counts"}, indent=1))
    typer.echo(json.dumps({k: {"patients": c["patients"], "scans": c["scans"]} for k, c in summary["counts"].items()}))


@app.command()
def synth(
    out: Annotated[Path | None, typer.Argument(help="Output folder (default: synth.out).")] = None,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Generate the synthetic head-CT data set: DICOM series + CQ500-style reads.csv."""
    _run_job("synth", params_file, overrides, {"out": out.resolve()} if out is not None else None)


@app.command()
def ingest(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="SRC DEST (default: ingest.src, ingest.dest), or `merge DEST [STORE...]` to join "
                            "the shards of a --shard job array into DEST.", show_default=False),
    ] = None,
    workers: Annotated[
        str | None, typer.Option("--workers", help="Worker processes, or 'auto' (CPU count); capped by memory.")
    ] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="K/N: convert only the studies of shard K of N (job arrays).")
    ] = None,
    preprocess: Annotated[
        str | None, typer.Option("--preprocess", help="A named recipe for ingest.preprocess, e.g. fm-hct (the "
                                                      "recipe of imported FM-HCT weights).")
    ] = None,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """DICOM/NIfTI -> canonical int16 RAS volumes + manifest + rejects + labels (+ local linkage file)."""
    paths = paths or []
    overrides = list(overrides or [])
    if preprocess is not None:  # before the user's --set, which is refused on the same keys (one recipe, stated once)
        from headct.config.base import PREPROCESS_MODES

        if preprocess not in PREPROCESS_MODES:
            raise _fail(f"headct ingest: unknown --preprocess {preprocess!r}; known: {', '.join(PREPROCESS_MODES)}", 2)
        clash = [o for o in overrides if o.split("=", 1)[0].strip().startswith("ingest.preprocess.")]
        if clash:
            raise _fail(f"headct ingest: --preprocess {preprocess} sets ingest.preprocess; drop {clash}", 2)
        overrides = [f"ingest.preprocess.{k}={list(v) if isinstance(v, tuple) else v}"
                     for k, v in PREPROCESS_MODES[preprocess].items()] + overrides
    if workers is not None:
        overrides.append(f"ingest.workers={workers}")
    if shard is not None:
        overrides.append(f"ingest.shard={shard}")
    if paths[:1] == ["merge"]:
        if len(paths) < 2:
            raise _fail("headct ingest merge: give the store folder DEST (and any other stores to join into it)", 2)
        _run_job("ingest", params_file, overrides, runner="run_merge",
                 extra=[Path(p).resolve() for p in paths[1:]])
        return
    if len(paths) not in (0, 2):
        raise _fail("headct ingest: give both SRC and DEST, or neither (then params.yaml decides)", 2)
    positional: dict[str, Any] = {}
    if paths:
        src, dest = (Path(p) for p in paths)
        positional.update(src=src.resolve(), dest=dest.resolve())  # relative to where the user stands
        # An ad hoc folder is not the configured data set: no labels file, patients keyed by DICOM PatientID,
        # unless the user says otherwise with --set.
        adhoc = {"labels": None, "labels_format": "none", "patient_key": "dicom"}
        given = {item.split("=", 1)[0].strip() for item in overrides}
        positional.update({k: v for k, v in adhoc.items() if f"ingest.{k}" not in given})
    _run_job("ingest", params_file, overrides, positional)


@app.command()
def split(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Patient-disjoint, label-stratified, seeded train/val/test split of a store."""
    _run_job("split", params_file, overrides)


@app.command()
def pretrain(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Self-supervised pre-training of the 3D ViT encoder: MAE or DINO (pretrain.method); model directory with a
    model card, registered in MLflow when pretrain.register_as names a model."""
    _run_job("pretrain", params_file, overrides)


@app.command()
def probe(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Linear probes on frozen features: pre-trained vs random init, HU histogram and any cached external encoder;
    AUROC/AP with patient-bootstrap CIs."""
    _run_job("probe", params_file, overrides)


@app.command()
def finetune(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Fine-tune encoder + head (best epoch on val AUROC), score test once, write a classifier directory with a
    model card."""
    _run_job("finetune", params_file, overrides)


@app.command()
def ceiling(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """The supervised ceiling: fine-tuning with the `ceiling` section (a model from scratch on the labels of
    train + pool), what the encoder arms are compared against."""
    _run_job("finetune", params_file, overrides, section_name="ceiling")


@app.command()
def tune(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Optuna TPE over fine-tuning learning rates and weight decay; the best values to tune.best_params, which
    `headct finetune` reads."""
    _run_job("tune", params_file, overrides, also=("finetune",))


@app.command()
def extract(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Embed every scan of the split files once (pre-trained, random init, HU histogram, external encoders)."""
    _run_job("extract", params_file, overrides)


@app.command()
def fewshot(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Few-shot probes: K positives + K negatives per label by patient, several seeds, mean and spread."""
    _run_job("fewshot", params_file, overrides)


@app.command()
def retrieval(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Query-by-embedding retrieval (cosine, same patient excluded): mAP per label and model."""
    _run_job("retrieval", params_file, overrides)


@app.command()
def compare(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Does pre-training help? Pre-trained vs best random init (CIs), vs the histogram (paired CI), gap closed."""
    _run_job("compare", params_file, overrides)


@app.command()
def predict(
    study: Annotated[Path, typer.Argument(help="A DICOM folder (any layout) or a .nii/.nii.gz file.")],
    classifier: Annotated[Path | None, typer.Option(help="Fine-tuned classifier directory.")] = None,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Per-finding probabilities and decisions for one study, with the series chosen and its QC flags."""
    positional: dict[str, Any] = {"study": study.resolve()}
    if classifier is not None:
        positional["classifier_dir"] = classifier.resolve()
    _run_job("predict", params_file, overrides, positional)


@app.command()
def explain(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """Attention maps (CLS attention, rollout) and occlusion sensitivity as axial montages per label."""
    _run_job("explain", params_file, overrides)


@app.command()
def report(params_file: ParamsOpt = None, overrides: SetOpt = None) -> None:
    """The results page (results.md + figures): probe, few-shot, retrieval, fine-tune and compare tables with 95%
    CIs, and pre-training's held-out loss."""
    _run_job("report", params_file, overrides)


@app.command()
def slurm(
    job: Annotated[str, typer.Argument(help="ingest (array + dependent merge), pretrain (multi-node torchrun) or tune "
                                            "(an array sharing one Optuna study).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sbatch commands; submit nothing.")] = False,
    params_file: ParamsOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Submit a Slurm template of slurm/ with resources from params.yaml's `slurm` section; --params and --set
    reach the submitted jobs too. Prints each sbatch command and the job ids."""
    request = [job, dry_run, params_file.resolve() if params_file else None, list(overrides or [])]
    _run_job("slurm", params_file, overrides, runner="submit", extra=request, also=("ingest",))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
