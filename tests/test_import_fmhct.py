"""`headct import-weights fm-hct`: MONAI's ViT in FM-HCT's configuration, saved as FM-HCT saves it, becomes a headct
model directory whose final-norm tokens (CLS included) equal MONAI's; the conversion is strict and the loader
refuses pickled objects outside its allow-list."""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from headct.errors import InputError
from headct.models.import_fmhct import FMHCT_PREPROCESS, import_fmhct, load_checkpoint
from headct.models.model_dir import load_model_dir

FMHCT_PARAMETERS = 89_404_416  # shared/REFERENCE.md, section 4: ViT-B/12 at 96^3 with its learned position table


def monai_vit(depth: int = 12, width: int = 768, heads: int = 12, img: int = 96, patch: int = 12,
              qkv_bias: bool = False, seed: int = 0, **kw):
    """MONAI's ViT as FM-HCT configures it (CLS token, so `classification=True` and its unused head; position
    table started from 3D sin-cos and trained, so here perturbed; final LayerNorm eps 1e-6), at random init with
    every norm, bias, token and position entry moved off its initial value so a mis-mapped tensor shows."""
    from monai.networks.nets import ViT

    torch.manual_seed(seed)
    model = ViT(in_channels=3, img_size=img, patch_size=patch, hidden_size=width, mlp_dim=4 * width,
                num_layers=depth, num_heads=heads, pos_embed_type="sincos", classification=True,
                qkv_bias=qkv_bias, **kw)
    model.norm.eps = 1e-6
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "position" in name or "cls" in name:
                p.add_(torch.randn_like(p) * 0.2)
        model.patch_embedding.position_embeddings.add_(
            torch.randn_like(model.patch_embedding.position_embeddings) * 0.2)
    return model.eval()


def monai_tokens(model, x: torch.Tensor) -> torch.Tensor:
    """MONAI's final-norm tokens (B, 1 + N, D), CLS first (its forward returns the classification head's output)."""
    return model.norm(model(x)[1][-1])


def save_wrapped(model, path: Path) -> Path:
    """As FM-HCT's training script saves: a dict with the DDP/DINO-prefixed state dict, its args and the epoch."""
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1.5e-4, arch="vit_base"), "epoch": 3}, path)
    return path


def test_vit_b_tokens_equal_monai_and_the_directory_records_fmhct(tmp_path: Path) -> None:
    model = monai_vit()
    src = save_wrapped(model, tmp_path / "checkpoint.pth")
    result = CliRunner().invoke(_app(), ["import-weights", "fm-hct", str(src), str(tmp_path / "fm-hct")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["parameters"] == FMHCT_PARAMETERS and summary["dropped_unused_tensors"] == 2 * 12 + 2  # cross norms, head
    encoder, config = load_model_dir(tmp_path / "fm-hct")
    assert encoder.arch["pos_embed"] == "learned" and encoder.arch["qkv_bias"] is False
    assert config["preprocess"]["version"] == FMHCT_PREPROCESS.version and config["preprocess"]["fit"] == "stretch"
    assert [(w["level"], w["width"]) for w in config["windows"]] == [(40, 80), (80, 200), (600, 2800)]
    assert "checkpoint" not in json.dumps(config["provenance"]).replace("checkpoint.pth", "")  # file name only
    x = torch.rand(1, 3, 96, 96, 96)
    with torch.no_grad():
        ours, theirs = encoder.forward_features(x), monai_tokens(model, x)
    assert ours.shape == (1, 513, 768)
    assert (ours - theirs).abs().max().item() <= 1e-4


def _app():
    import cli

    return cli.app


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_a_plain_state_dict_with_compile_prefix_imports_and_matches(tmp_path: Path, qkv_bias: bool) -> None:
    model = monai_vit(depth=2, width=48, heads=4, img=24, patch=6, qkv_bias=qkv_bias)
    torch.save(collections.OrderedDict((f"_orig_mod.{k}", v) for k, v in model.state_dict().items()),
               tmp_path / "model_weights.pth")
    import_fmhct(tmp_path / "model_weights.pth", tmp_path / "m", num_heads=4)
    encoder, _ = load_model_dir(tmp_path / "m")
    assert encoder.arch["qkv_bias"] is qkv_bias and encoder.arch["img_size"] == [24, 24, 24]
    x = torch.rand(3, 3, 24, 24, 24)
    with torch.no_grad():
        assert (encoder.forward_features(x) - monai_tokens(model, x)).abs().max().item() <= 1e-5
    with pytest.raises(InputError, match="already holds a model directory"):
        import_fmhct(tmp_path / "model_weights.pth", tmp_path / "m", num_heads=4)


class Payload:  # a class a checkpoint must not be allowed to instantiate
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickled_objects_outside_the_allow_list_are_refused_naming_them(tmp_path: Path, capsys) -> None:
    state = monai_vit(depth=1, width=24, heads=2, img=12, patch=6).state_dict()
    torch.save({"state_dict": state, "hook": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(InputError, match=r"evil\.pth: refused: .*allow-list \(builtins\.print\)"):
        load_checkpoint(tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out
    torch.save({"w": Payload()}, tmp_path / "legacy_evil.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy_evil\.pth: refused: .*allow-list \((builtins\.)?print\)"):
        load_checkpoint(tmp_path / "legacy_evil.pth")
    assert "code ran" not in capsys.readouterr().out
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)  # the pre-zip format is read
    assert set(load_checkpoint(tmp_path / "legacy.pth")) == set(state)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth: not a readable torch checkpoint"):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(InputError, match=r"gone\.pth: not found"):
        load_checkpoint(tmp_path / "gone.pth")
    torch.save({"state_dict": state, "optimizer": {"lr": 0.1}, "args": argparse.Namespace(x=1)}, tmp_path / "ok.pth")
    assert set(load_checkpoint(tmp_path / "ok.pth")) == set(state)  # beside state_dict, anything else is ignored
    torch.save({**state, "epoch": 3}, tmp_path / "mixed.pth")
    with pytest.raises(InputError, match=r"not tensors \['epoch'\]"):
        load_checkpoint(tmp_path / "mixed.pth")


def _import_state(tmp_path: Path, state: dict, **kw) -> None:
    torch.save(state, tmp_path / "w.pth")
    import_fmhct(tmp_path / "w.pth", tmp_path / "out", **kw)


def test_the_mapping_is_strict(tmp_path: Path) -> None:
    state = monai_vit(depth=2, width=24, heads=2, img=12, patch=6).state_dict()
    cases = [
        ({**state, "blocks.0.attn.rel_pos.weight": torch.zeros(3)}, {}, r"unmapped keys \['blocks\.0\.attn\.rel_pos"),
        ({**state, "register_tokens": torch.zeros(1, 4, 24)}, {}, r"unmapped keys \['register_tokens'\]"),
        ({k: v for k, v in state.items() if k != "blocks.1.mlp.linear2.bias"}, {},
         r"missing \['blocks\.1\.mlp\.fc2\.bias'\]"),
        ({**state, "blocks.1.norm2.weight": torch.ones(25)}, {}, r"wrong shapes \['blocks\.1\.norm2\.weight \[25\]"),
        ({**state, "norm.bias": torch.full((24,), float("nan"))}, {}, r"non-finite values .*'norm\.bias'"),
        ({k: v for k, v in state.items() if k != "cls_token"}, {}, "no 'cls_token'"),
        (state, {"num_heads": 5}, "not divisible by num_heads 5"),
        (state, {"img_size": 18}, "not a cube grid of patch 6 for img_size 18"),
        ({**state, "module.norm.bias": state["norm.bias"]}, {}, "two entries become 'norm.bias'"),
    ]
    for bad, kw, message in cases:
        with pytest.raises(InputError, match=message):
            _import_state(tmp_path, bad, **kw)
        assert not (tmp_path / "out").exists(), "nothing written on refusal"
    perceptron = monai_vit(depth=1, width=24, heads=2, img=12, patch=6, proj_type="perceptron").state_dict()
    with pytest.raises(InputError, match="'perceptron' patch embedding .* is not supported"):
        _import_state(tmp_path, perceptron)


def test_default_encoders_keep_their_arch_and_weights(tmp_path: Path) -> None:
    """The new arch options leave existing model directories as they were: no new arch keys, no new tensors."""
    from headct.models.vit import build_encoder

    arch = {"name": "tiny", "img_size": [16, 16, 16], "patch_size": 8, "in_chans": 3, "embed_dim": 32,
            "depth": 1, "num_heads": 2}
    enc = build_encoder(arch)
    assert set(enc.arch) == {*arch, "mlp_ratio", "qkv_bias", "num_registers"}
    assert "pos_embed" not in enc.state_dict() and enc.blocks[0].norm1.eps == 1e-6
    learned = build_encoder({**arch, "pos_embed": "learned", "block_norm_eps": 1e-5})
    assert learned.state_dict()["pos_embed"].shape == (1, 8, 32) and learned.blocks[0].norm1.eps == 1e-5
    assert torch.equal(learned.pos_embed_for(learned.grid), enc.pos_embed)  # started from the same sin-cos table
    with pytest.raises(ValueError, match="pos_embed must be"):
        build_encoder({**arch, "pos_embed": "rope"})


# --------------------------------------------------------------------------------------------- the whole harness
def _fmhct_project(root: Path) -> None:
    """A 24-patient store made with FM-HCT's preprocessing spec (96^3 stretch): a head-like ball, ICH = a 70 HU
    blob; split 12 train / 6 val / 6 test patients (half positive each); an imported depth-2 FM-HCT-layout model."""
    import numpy as np

    from tests.store_helpers import write_store

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, 96, dtype=np.float32)] * 3, indexing="ij"))
    dist = np.sqrt((g**2).sum(0))
    blob = np.sqrt(((g - np.array([0.3, 0, 0], np.float32)[:, None, None, None]) ** 2).sum(0)) < 0.2
    volumes, rows = {}, []
    for i in range(24):
        vol = np.where(dist < 0.9, 1000.0, -1024.0).astype(np.float32)
        vol[dist < 0.8] = 35.0
        if i % 2:
            vol[blob] = 70.0
        volumes[f"ser_{i:016x}"] = (vol + rng.normal(0, 5, vol.shape)).astype(np.int16)
    paths = write_store(root / "data/store/fm", volumes, spec=FMHCT_PREPROCESS)
    splits = root / "data/splits/fm"
    splits.mkdir(parents=True)
    for i, path in enumerate(paths):
        rows.append({"split": "train" if i < 12 else "val" if i < 18 else "test",
                     "img_path": path.relative_to(root).as_posix(), "scan_id": path.stem,
                     "patient_id": f"pat_{i:016x}", "ICH": i % 2})
    import pandas as pd

    frame = pd.DataFrame(rows)
    for split, part in frame.groupby("split"):
        part.drop(columns="split").to_csv(splits / f"{split}.csv", index=False)
    (splits / "split.json").write_text(json.dumps({"store": "data/store/fm", "seed": 0}))
    save_wrapped(monai_vit(depth=2, width=48, heads=4), root / "fm.pth")
    import_fmhct(root / "fm.pth", root / "models/fm-hct", num_heads=4)


def test_an_imported_model_runs_through_extract_probe_fewshot_retrieval_finetune_and_report(
    tmp_path: Path, job_ctx, torch_one_thread
) -> None:
    from headct.config import (
        ExtractConfig,
        FewshotConfig,
        JobContext,
        PreprocessSpec,
        ProbeConfig,
        ReportConfig,
        RetrievalConfig,
    )
    from headct.data.volumes import check_preprocessing
    from pipelines import extract, fewshot, finetune, probe, report, retrieval
    from tests.finetune_helpers import finetune_cfg
    from tests.probe_helpers import write_volumes

    _fmhct_project(tmp_path)
    ctx = JobContext(root=tmp_path, tracking=job_ctx.tracking)
    splits, model, reports = tmp_path / "data/splits/fm", tmp_path / "models/fm-hct", tmp_path / "reports"
    features = tmp_path / "data/features/fm"
    summary = extract.run(ExtractConfig(splits=splits, model_dir=model, out=features, batch_size=4, device="cpu",
                                        hu_histogram=False), ctx)
    assert summary == {"scans": 24, "models": {"pretrained": 48, "random_init": 48}}
    assert json.loads((features / "pretrained.json").read_text())["method"] == "fm-hct"
    probe.run(ProbeConfig(splits=splits, features=features, report_dir=reports / "probe", bootstrap=20,
                          c_grid=(1.0,)), ctx)
    assert set(json.loads((reports / "probe/metrics.json").read_text())["pretrained"]) == {"ICH"}
    fewshot.run(FewshotConfig(features=features, splits=splits, report_dir=reports / "fewshot", shots=(1, 2),
                              seeds=2, c_grid=(1.0,)), ctx)
    few = json.loads((reports / "fewshot/metrics.json").read_text())
    assert set(few["results"]["pretrained"]["ICH"]) == {"1", "2"}
    retrieval.run(RetrievalConfig(features=features, splits=splits, report_dir=reports / "retrieval"), ctx)
    assert "ICH" in json.loads((reports / "retrieval/metrics.json").read_text())["pretrained"]
    tuned = finetune.run(finetune_cfg(tmp_path, splits=splits, model_dir=model, out_dir=tmp_path / "models/cls",
                                      report_dir=reports / "finetune", epochs=1, labels=["ICH"]), ctx)
    assert tuned["best_epoch"] == 0 and (tmp_path / "models/cls/model.safetensors").is_file()
    out = report.run(ReportConfig(probe_metrics=reports / "probe/metrics.json",
                                  probe_predictions=reports / "probe/predictions.csv", pretrain_metrics=None,
                                  fewshot_metrics=reports / "fewshot/metrics.json",
                                  retrieval_metrics=reports / "retrieval/metrics.json",
                                  finetune_metrics=reports / "finetune/metrics.json", report_dir=reports / "report"),
                     ctx)
    assert "heldout_loss_end" not in out and "mean_auroc_pretrained" in out
    text = (reports / "report/results.md").read_text()
    assert "## Fine-tuning" in text and "pretext loss" not in text

    # A store made with another recipe is refused by name, with the explicit override named.
    write_volumes(tmp_path / "other", 2, shape=(96, 96, 96))
    other = tmp_path / "other_split"
    other.mkdir()
    (other / "train.csv").write_text("img_path,scan_id,patient_id,ICH\nother/volumes/ser_0000.npy,ser_0000,p,0\n")
    assert json.loads((tmp_path / "other/preprocess.json").read_text())["version"] != FMHCT_PREPROCESS.version
    assert PreprocessSpec(shape=(96, 96, 96), spacing_mm=6.0).version != FMHCT_PREPROCESS.version
    with pytest.raises(InputError, match=r"differs from the model's .*extract\.allow_preprocess_mismatch"):
        check_preprocessing(other, tmp_path, json.loads((model / "config.json").read_text()), model,
                            setting="extract.allow_preprocess_mismatch")


def test_ingest_preprocess_fm_hct_makes_the_store_an_imported_model_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`headct ingest SRC DEST --preprocess fm-hct`: the store's recipe is the imported model's (same version), each
    volume stretched to 96^3 with its own per-axis spacing in the affine; unknown modes and clashes are refused."""
    import numpy as np
    import pandas as pd

    import cli
    from headct.data import store
    from headct.data.volumes import check_preprocessing
    from tests.dicom_factory import SeriesSpec, write_series

    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(f"tracking:\n  uri: sqlite:///{tmp_path}/mlflow.db\ningest:\n  workers: 1\n"
                                         "  preprocess:\n    shape: [32, 32, 32]\n    spacing_mm: 6.0\n")
    write_series(tmp_path / "export" / "a", SeriesSpec(), patient_id="PID-FMHCT-0001")
    monkeypatch.chdir(project)
    monkeypatch.setenv("HEADCT_PSEUDONYM_KEY", "a-test-key-of-at-least-16-bytes")
    runner = CliRunner()
    for bad, message in ((["--preprocess", "nyu"], "unknown --preprocess 'nyu'; known: fm-hct"),
                         (["--preprocess", "fm-hct", "--set", "ingest.preprocess.fit=isotropic"], "drop")):
        refused = runner.invoke(cli.app, ["ingest", str(tmp_path / "export"), "store", *bad])
        assert refused.exit_code == 2 and message in refused.output
    result = runner.invoke(cli.app, ["ingest", str(tmp_path / "export"), "store", "--preprocess", "fm-hct"])
    assert result.exit_code == 0, result.output
    assert store.read_preprocess(project / "store")["version"] == FMHCT_PREPROCESS.version
    manifest = store.read_manifest(project / "store")
    row = manifest.iloc[0]
    assert store.read_volume(project / "store", row["volume"]).shape == (96, 96, 96)
    assert np.ptp(np.diag(store.affine_of(row))[:3]) > 0.1 and pd.isna(row["spacing_mm"])  # per axis, anisotropic

    split = project / "split"
    split.mkdir()
    pd.DataFrame({"img_path": [f"store/{row['volume']}"], "scan_id": [row["scan_id"]],
                  "patient_id": [row["patient_id"]], "ICH": [0]}).to_csv(split / "train.csv", index=False)
    save_wrapped(monai_vit(depth=1, width=24, heads=2), tmp_path / "fm.pth")
    import_fmhct(tmp_path / "fm.pth", tmp_path / "model", num_heads=2)
    config = json.loads((tmp_path / "model/config.json").read_text())
    assert check_preprocessing(split, project, config, tmp_path / "model") is None  # same recipe: accepted
    assert "> 0 HU" in config["provenance"]["source_recipe"]
