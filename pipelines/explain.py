"""Job `headct explain`: where the encoder looks, for one scan per label, as axial montages in the brain window.

Recipe: read the chosen split (val by default: test is kept for the final evaluation); per label, take a positive
scan (the classifier's most confident one when `classifier_dir` is given, else the first by scan id, so the
choice is reproducible); compute the requested maps on its canonical volume (CLS attention and rollout from a ViT
encoder, or the restoration residual of a masked-restoration CNN; occlusion sensitivity through the classifier's
probability for that label); write one montage PNG per method under cfg.report_dir plus explain.json naming the scans (pseudonyms) and the slices shown.
"""

from __future__ import annotations

from typing import Any

from headct.config.base import JobContext
from headct.config.evaluate import ExplainConfig
from headct.errors import InputError


def _choose_scans(cfg: ExplainConfig, frame: Any, scorer: Any) -> dict[str, Any]:
    """label -> the split row to explain (positives only)."""
    from headct.data.splits import label_columns

    labels = list(cfg.labels) if cfg.labels is not None else label_columns(frame)
    if scorer is not None and cfg.labels is None:  # by default, the labels the classifier was trained for
        labels = [label for label in labels if label in scorer.labels]
    missing = [label for label in labels if label not in frame.columns]
    if missing:
        raise InputError(f"{cfg.splits / f'{cfg.split}.csv'}: no column for label(s) {missing}")
    chosen = {}
    for label in labels:
        positives = frame[frame[label] == 1].sort_values("scan_id")
        if positives.empty:
            continue
        if scorer is not None:
            positives = positives.assign(_score=[scorer.label_score(row, label) for _, row in positives.iterrows()])
            positives = positives.sort_values(["_score", "scan_id"], ascending=[False, True])
        chosen[label] = positives.iloc[0]
    return chosen


class _ClassifierScorer:
    """A fine-tuned classifier's probability for one label, on HU volumes (for choosing scans and occlusion)."""

    def __init__(self, classifier_dir: Any, root: Any, device: Any) -> None:
        from headct.models.classifier_dir import load_classifier

        self.model, self.config = load_classifier(classifier_dir, device)
        self.labels = list(self.config["labels"])
        self.root, self.device = root, device

    def scores(self, hu: Any, label: str) -> Any:
        import torch

        from headct.models.classifier_dir import predict_proba

        if label not in self.labels:
            raise InputError(f"classifier has no output for {label} (it predicts {self.labels})")
        return torch.as_tensor(predict_proba(self.model, hu)[:, self.labels.index(label)])

    def label_score(self, row: Any, label: str) -> float:
        import torch

        from headct.data.volumes import load_volume

        spec = self.config["preprocess"]
        hu = torch.from_numpy(load_volume(self.root / row["img_path"], row["scan_id"], shape=spec.get("shape"),
                                          version=spec.get("version")))[None]
        return float(self.scores(hu, label)[0])


def run(cfg: ExplainConfig, ctx: JobContext) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from headct import tracking
    from headct.data.splits import read_split
    from headct.data.volumes import load_volume
    from headct.data.windows import hu_to_windows
    from headct.device import resolve_device
    from headct.encoder import load_encoder
    from headct.eval.attention import attention_rollout, cls_attention, occlusion_sensitivity
    from headct.eval.explain_plots import MontageRow, plot_montage, slices_for
    from headct.io import write_json

    device = resolve_device(cfg.device)
    console = Console()
    encoder = load_encoder(cfg.model_dir, device)
    methods = list(dict.fromkeys(cfg.methods))
    scorer = _ClassifierScorer(cfg.classifier_dir, ctx.root, device) if cfg.classifier_dir else None
    if "occlusion" in methods and scorer is None:
        console.print("[yellow]note:[/] occlusion needs explain.classifier_dir (a fine-tuned classifier); skipped")
        methods.remove("occlusion")
    restoration = None
    if encoder.method == "mim":  # the small CNN: no attention; its restoration head explains instead
        from headct.models.model_dir import load_restoration, read_config

        for method in [m for m in methods if m in ("cls", "rollout")]:
            console.print(f"[yellow]note:[/] {method} needs a ViT's attention; {cfg.model_dir} is a masked-restoration "
                          "CNN (use the residual method); skipped")
            methods.remove(method)
        restoration = load_restoration(cfg.model_dir, encoder.model, read_config(cfg.model_dir)).to(device)
    elif "residual" in methods:
        console.print(f"[yellow]note:[/] residual needs a masked-restoration (mim) model directory; {cfg.model_dir} "
                      f"is {encoder.method}; skipped")
        methods.remove("residual")
    cube = restoration.cube if restoration is not None else encoder.model.patch_size  # occlusion's cube edge
    frame = read_split(cfg.splits, cfg.split)
    chosen = _choose_scans(cfg, frame, scorer)
    if not chosen:
        console.print(f"[yellow]note:[/] no label has a positive scan in {cfg.split}; montages say so")

    rows: dict[str, list[MontageRow]] = {m: [] for m in methods}
    shown: dict[str, Any] = {}
    brain = [w for w in encoder.windows if w.get("name") == "brain"] or encoder.windows[:1]
    for label, row in chosen.items():
        hu = torch.from_numpy(load_volume(ctx.root / row["img_path"], row["scan_id"], shape=encoder.grid,
                                          version=encoder.preprocess.get("version")))
        x = hu_to_windows(hu[None].to(device), encoder.windows)
        display = hu_to_windows(hu[None], brain)[0, 0].numpy()
        maps = {}
        if "cls" in methods:
            maps["cls"] = cls_attention(encoder.model, x)[0]
        if "rollout" in methods:
            maps["rollout"] = attention_rollout(encoder.model, x)[0]
        if "residual" in methods:
            maps["residual"] = restoration.residual_heat(x)[0].float().cpu().numpy()
        if "occlusion" in methods:
            maps["occlusion"] = occlusion_sensitivity(lambda v, lab=label: scorer.scores(v, lab), hu, cube,
                                                      cfg.baseline_hu)
        head = hu.numpy() > -300  # HU: skin and everything denser
        for method, heat in maps.items():
            rows[method].append(MontageRow(label, row["scan_id"], display, heat, head))
        shown[label] = {"scan_id": row["scan_id"], "patient_id": row["patient_id"],
                        "slices": {m: slices_for(h, cfg.slices, head) for m, h in maps.items()}}

    titles = {"cls": "last-block CLS attention (mean over heads)", "rollout": "attention rollout",
              "occlusion": f"occlusion sensitivity (cubes set to {cfg.baseline_hu:g} HU)",
              "residual": "restoration residual (hyperdense, not restorable from context)"}
    files = {"occlusion": "occlusion.png", "residual": "restoration_residual.png"}
    outputs = [plot_montage(rows[m], cfg.slices, cfg.report_dir / files.get(m, f"attention_{m}.png"),
                            f"{titles[m]} - {cfg.split} split, {encoder.method} encoder") for m in methods]
    summary = {"split": cfg.split, "methods": methods, "scans": shown,
               "map_normalisation": "each map sums to 1 over the volume's voxels"}
    write_json(cfg.report_dir / "explain.json", summary)
    outputs.append(cfg.report_dir / "explain.json")
    with tracking.job_run(ctx.tracking, "explain", cfg, ctx.root) as mlrun:
        mlrun.log_metrics({"labels_explained": len(shown)})
        for path in outputs:
            mlrun.log_artifact(path, "explain")
    for path in outputs:
        console.print(f"wrote {path}")
    return {"labels_explained": len(shown), "outputs": [str(p) for p in outputs]}
