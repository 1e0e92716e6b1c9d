"""Ordinary faults outside ingest (issue 12): a broken model directory, params file or checkpoint is refused with
one error naming the file and the reason, before anything is allocated or unpickled; never a bare traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from headct.config import ConfigError, load_params
from headct.errors import InputError
from headct.models.model_dir import CONFIG, WEIGHTS, load_model_dir, save_model_dir
from headct.models.vit import build_encoder
from headct.train.checkpoint import load_checkpoint, save_checkpoint

ARCH = {"name": "tiny", "img_size": 32, "patch_size": 16, "in_chans": 3, "embed_dim": 48, "depth": 2, "num_heads": 2}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    config = {"preprocess": {}, "windows": [], "method": "mae", "provenance": {}}
    return save_model_dir(tmp_path / "model", build_encoder(ARCH), config)


def edit_config(path: Path, **arch) -> None:
    config = json.loads((path / CONFIG).read_text())
    config["arch"].update(arch)
    (path / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize(("arch", "message"), [
    ({"embed_dim": 1_000_000}, r"arch.embed_dim = 1000000 is not an integer in \[1, 8192\]"),
    ({"depth": 10**9}, r"arch.depth = 1000000000 is not an integer"),
    ({"depth": 2.5}, r"arch.depth = 2.5 is not an integer"),
    ({"img_size": [4096, 32, 32]}, r"arch.img_size = \[4096, 32, 32\]"),
    ({"img_size": 2048, "patch_size": 1}, r"makes 8589934592 patches"),
    ({"mlp_ratio": 1e9}, r"arch.mlp_ratio = 1000000000.0 is not a number"),
    # within every bound, but 4096 wide x 256 deep is ~52 G parameters, and the file holds 0.3 MB
    ({"embed_dim": 4096, "depth": 256, "num_heads": 32}, r"describes about \d+\.\d M parameters, but .*model.safetensors"),
])
def test_an_absurd_architecture_is_refused_before_anything_is_built(model_dir: Path, arch: dict, message: str,
                                                                    monkeypatch) -> None:
    edit_config(model_dir, **arch)
    built = []
    monkeypatch.setattr("headct.models.model_dir.build_encoder", lambda a: built.append(a))
    with pytest.raises(InputError, match=message) as err:
        load_model_dir(model_dir)
    assert str(model_dir / CONFIG) in str(err.value) and built == []  # refused before any allocation


def test_nan_or_inf_weights_are_refused_naming_the_file_and_the_tensor(model_dir: Path) -> None:
    assert load_model_dir(model_dir)[0] is not None
    state = load_file(str(model_dir / WEIGHTS))
    state["blocks.1.mlp.fc1.weight"][3, 4] = float("nan")
    state["norm.bias"][0] = float("inf")
    save_file(state, str(model_dir / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model.safetensors: NaN or infinite values in tensor\(s\) "
                                         r"blocks.1.mlp.fc1.weight, norm.bias"):
        load_model_dir(model_dir)


def test_a_params_file_that_is_not_utf8_is_a_config_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_bytes(b"ingest:\n  workers: 1\n# r\xe9sum\xe9 of the settings\n")
    with pytest.raises(ConfigError, match=r"params.yaml: params file is not UTF-8 text \(byte 0xe9 on line 3\)"):
        load_params(root=tmp_path)


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("ingest:\n  workers: 1\nsplit:\n  seed: 1\ningest:\n  workers: 2\n", "ingest", "1 and 5"),
    ("ingest:\n  qc:\n    min_slices: 3\n    min_slices: 4\n", "min_slices", "3 and 4"),
])
def test_a_key_given_twice_in_a_params_file_is_refused_naming_it(tmp_path: Path, text: str, key: str,
                                                                 lines: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=rf"params.yaml: the key '{key}' appears twice .*lines {lines}"):
        load_params(root=tmp_path)


def test_a_checkpoint_that_is_junk_a_pickle_or_incomplete_is_refused_naming_the_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint" * 8)
    with pytest.raises(InputError, match=r"junk.pt: not a (readable|headct) checkpoint"):
        load_checkpoint(junk)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": 1, "where": Path("/tmp")}, pickled)  # an object torch's weights-only reader refuses
    with pytest.raises(InputError, match=r"pickled.pt: not a headct checkpoint: it holds a Python object "
                                         r"\(pathlib.PosixPath\)") as err:
        load_checkpoint(pickled)
    assert "weights_only" not in str(err.value)  # never the advice to unpickle it anyway
    model = torch.nn.Linear(2, 2)
    full = tmp_path / "full.pt"
    save_checkpoint(full, model, torch.optim.SGD(model.parameters(), lr=0.1), 3, {"seed": 0})
    assert load_checkpoint(full)["step"] == 3
    state = torch.load(full, weights_only=True)
    del state["optimizer"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(InputError, match=r"partial.pt: headct checkpoint without \['optimizer'\]"):
        load_checkpoint(tmp_path / "partial.pt")
