"""Resolving the configuration: project root, params file, tuned-parameters file, ``--set`` overrides, and
validation errors that name the key, the value and what is allowed."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from headct.config.base import resolve_path
from headct.config.finetune import TUNED_KEYS, FinetuneConfig
from headct.config.params import Params
from headct.errors import ConfigError  # noqa: F401  (re-exported: headct.config.ConfigError)

_TUNED_DEFAULT = FinetuneConfig.model_fields["tuned_params"].default


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(f"the key {key!r} appears twice in one mapping (lines {first} and {again}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently, so a
    second `ingest:` section would quietly replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, seen[key] + 1, key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, what: str = "params file") -> Any:
    """A YAML file's content, or ConfigError naming the file: not readable, not UTF-8, not valid YAML, or a key
    given twice in one mapping (line numbers in the message)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {what} not readable ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} on line {line}); "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506  a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None


def find_project_root(start: Path | None = None) -> Path:
    """Nearest folder upward holding params.yaml or dvc.yaml, else the current folder."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "params.yaml").is_file() or (folder / "dvc.yaml").is_file():
            return folder
    return here


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"--set {item!r}: the key must name a section and a field, like pretrain.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from exc
    return parts, value


def _apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(parts)}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the model at `loc` (without its last element), for did-you-mean hints."""
    model: Any = Params
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        key = ".".join(str(p) for p in loc) or "<root>"
        value = err.get("input")
        msg = err.get("msg", "")
        if err.get("type") == "extra_forbidden":
            allowed = _allowed_keys(loc)
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = "unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            msg += f"; allowed keys here: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {key}: {msg}")
        else:
            lines.append(f"  {key} = {value!r}: {msg}")
    return "\n".join(lines)


def _tuned_params_setting(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> Any:
    """finetune.tuned_params as the params file and the overrides leave it (None or "" = no tuned file)."""
    section = tree.get("finetune")
    value: Any = section.get("tuned_params", _TUNED_DEFAULT) if isinstance(section, dict) else _TUNED_DEFAULT
    for item in overrides:
        parts, raw = _parse_override(item)
        if parts == ["finetune", "tuned_params"]:
            value = raw
    return value


def _tuned_params_file(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], root: Path) -> Path | None:
    """The existing tuned-parameters file finetune.tuned_params names (an override of it counts), else None."""
    value = _tuned_params_setting(tree, overrides)
    if value in (None, ""):
        return None
    path = resolve_path(root, Path(value))
    return path if path.is_file() else None


def refuse_tuned_keys(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], root: Path, source: Path) -> None:
    """A params file may not set a tuned key (TUNED_KEYS, and any key an existing tuned file sets) while
    finetune.tuned_params names a tuned-parameters file: that file would replace the value, and a value written
    into params.yaml (by hand or by `dvc exp run -S`) would be ignored without a word. --set is not affected (it
    wins over the tuned file); finetune.tuned_params: null makes params.yaml's values the ones used."""
    section = tree.get("finetune")
    value = _tuned_params_setting(tree, overrides)
    if not isinstance(section, dict) or value in (None, ""):
        return
    tuned = resolve_path(root, Path(value))
    keys = set(TUNED_KEYS) | (set(read_tuned_params(tuned)) if tuned.is_file() else set())
    clash = sorted(k for k in section if k in keys and k != "tuned_params")
    if not clash:
        return
    state = "present" if tuned.is_file() else "not written yet"
    names = ", ".join(f"finetune.{k}" for k in clash)
    raise ConfigError(
        f"{source}: {names} set here, but finetune.tuned_params names {value} ({state}; written by `headct tune`), "
        f"whose values replace the params file's for {'this key' if len(clash) == 1 else 'these keys'}: refused "
        f"rather than silently ignored. To use your value set finetune.tuned_params: null as well (DVC: "
        f"`dvc exp run -S finetune.tuned_params=null -S finetune.{clash[0]}=...`); to have it tuned, remove it "
        f"from {source.name}; for one command, `--set finetune.{clash[0]}=...` wins over the tuned file."
    )


def read_tuned_params(path: Path) -> dict[str, Any]:
    """The `finetune:` mapping of a tuned-parameters file (written by `headct tune`)."""
    loaded = _read_yaml(path, "tuned-parameters file") or {}
    values = loaded.get("finetune") if isinstance(loaded, dict) else None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping under the key 'finetune'")
    return values


def load_params(
    params_file: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    root: Path | None = None,
) -> tuple[Params, Path]:
    """Resolve the configuration: defaults < params file < overrides. Returns (params, project root).

    The tuned-parameters file (finetune.tuned_params, when it exists) sits between the params file and the
    overrides: its `finetune:` values apply, and --set replaces them. The params file may not set a key the tuned
    file owns (`refuse_tuned_keys`), so no value in params.yaml is ever silently replaced.
    Raises ConfigError (the CLI turns it into exit code 2) naming the offending key and value.
    """
    root = root or find_project_root()
    path = params_file or (root / "params.yaml")
    tree: dict[str, Any] = {}
    source = "built-in defaults"
    if params_file is not None and not params_file.is_file():
        raise ConfigError(f"params file not found: {params_file}")
    if path.is_file():
        source = str(path)
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    refuse_tuned_keys(tree, overrides, root, path)
    tuned = _tuned_params_file(tree, overrides, root)
    if tuned is not None:
        section = tree.setdefault("finetune", {})
        if isinstance(section, dict):
            section.update(read_tuned_params(tuned))
            source += f" + tuned {tuned}"
    for item in overrides:
        parts, value = _parse_override(item)
        _apply_override(tree, parts, value)
    if overrides:
        source += " + --set " + " ".join(overrides)
    try:
        return Params.model_validate(tree), root
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None

