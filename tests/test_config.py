"""Config resolution: defaults < params.yaml < --set; every bad key or value is named before any work."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path
from typing import get_args

import pytest

import headct.config
from headct.config import (
    LABELS,
    ConfigError,
    Label,
    Params,
    PreprocessSpec,
    find_project_root,
    load_params,
    with_absolute_paths,
)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_apply_without_params_file(tmp_path: Path) -> None:
    params, root = load_params(root=tmp_path)
    assert root == tmp_path
    assert params.ingest.preprocess.shape == (96, 96, 96)
    assert params.ingest.preprocess.spacing_mm == 2.0
    assert [w.name for w in params.pretrain.windows] == ["brain", "subdural", "bone"]


def test_precedence_params_then_overrides(tmp_path: Path) -> None:
    write(tmp_path / "params.yaml", "pretrain:\n  lr: 0.001\n  batch_size: 4\n")
    params, _ = load_params(root=tmp_path, overrides=["pretrain.lr=0.01"])
    assert params.pretrain.lr == 0.01  # --set beats params.yaml
    assert params.pretrain.batch_size == 4  # params.yaml beats the default
    # A zero-valued override is applied, not ignored (a defect of the seed).
    params, _ = load_params(root=tmp_path, overrides=["pretrain.weight_decay=0"])
    assert params.pretrain.weight_decay == 0.0


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("pretrain:\n  lrr: 0.1\n", [], ["pretrain.lrr", "unknown key", "did you mean 'lr'"]),
        ("", ["pretrain.arch=huge"], ["pretrain.arch", "'huge'", "'tiny'", "'small'", "'base'"]),
        ("", ["pretrain.mask_ratio=1.5"], ["pretrain.mask_ratio", "1.5", "less than 1"]),
        ("", ["ingest.preprocess.shape=[64, 64]"], ["ingest.preprocess.shape", "3"]),
        ("", ["split.fractions=[0.5, 0.5, 0.5]"], ["split.fractions", "sum to 1"]),
        ("", ["synth.prevalence={IPHH: 0.2}"], ["synth.prevalence", "IPHH", "did you mean 'IPH'"]),
        ("bogus:\n  a: 1\n", [], ["bogus", "unknown key", "allowed keys here"]),
        ("", ["pretrain=3"], ["pretrain=3", "section and a field"]),
        ("", ["pretrain.patch_size=7"], ["patch_size=7", "must divide"]),
    ],
)
def test_bad_config_names_key_value_and_allowed(
    tmp_path: Path, yaml_text: str, overrides: list[str], expected: list[str]
) -> None:
    write(tmp_path / "params.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_params(root=tmp_path, overrides=overrides)
    for fragment in expected:
        assert fragment in str(info.value), str(info.value)


def test_missing_params_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(params_file=tmp_path / "nope.yaml", root=tmp_path)


def test_project_root_found_upward(tmp_path: Path) -> None:
    write(tmp_path / "dvc.yaml", "stages: {}\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert find_project_root(deep) == tmp_path.resolve()


def test_relative_paths_resolve_against_root(tmp_path: Path) -> None:
    cfg = with_absolute_paths(Params().ingest, tmp_path)
    assert cfg.dest == tmp_path / "data/store/synth"
    assert cfg.labels == tmp_path / "data/raw/synth/reads.csv"


def test_preprocess_version_tracks_every_field() -> None:
    base = PreprocessSpec()
    assert base.version == PreprocessSpec().version
    assert PreprocessSpec(spacing_mm=3.0).version != base.version
    assert PreprocessSpec(fit="stretch").version != base.version


def test_committed_params_yaml_is_valid(repo_root: Path) -> None:
    params, _ = load_params(params_file=repo_root / "params.yaml", root=repo_root)
    assert params.ingest.preprocess.shape == (64, 64, 64)  # the demo grid
    assert params.ingest.preprocess.spacing_mm == 3.0
    quick, _ = load_params(params_file=repo_root / "params-quick.yaml", root=repo_root)
    assert quick.synth.n_patients < params.synth.n_patients


def test_labels_are_the_label_type_in_order() -> None:
    # One hand-written list (the Literal); LABELS is derived from it, so the two cannot drift apart.
    assert get_args(Label) == LABELS
    assert LABELS[0] == "ICH" and LABELS[-1] == "Tumor" and len(set(LABELS)) == len(LABELS) == 15


def test_package_reexports_every_public_name_of_its_modules() -> None:
    # Importers use `from headct.config import X`; a name added to a submodule only would break them.
    missing = []
    for info in pkgutil.iter_modules(headct.config.__path__):
        module = importlib.import_module(f"headct.config.{info.name}")
        tree = ast.parse(Path(module.__file__).read_text())
        for node in tree.body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef):
                names = [node.name]
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [t.id for t in targets if isinstance(t, ast.Name)]
            else:
                continue
            for name in names:
                value = getattr(module, name)
                exported = name in headct.config.__all__ and getattr(headct.config, name) is value
                if not name.startswith("_") and not exported:
                    missing.append(f"headct.config.{info.name}.{name}")
    assert not missing, f"add to headct/config/__init__.py (import and __all__): {missing}"
