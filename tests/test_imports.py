"""The direction of imports (docs/architecture.md): cli -> pipelines -> headct, no job imports another job, and
inside headct lower layers never import upper ones. Read from the source (AST), so imports inside functions count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

# package prefix -> module prefixes it must never import
FORBIDDEN = {
    "headct": ("pipelines", "cli"),
    "headct.data": ("headct.models", "headct.train", "headct.eval", "headct.registry", "headct.encoder"),
    "headct.models": ("headct.train", "headct.eval", "headct.registry"),
    "headct.eval": ("headct.train",),  # fine-tuning (train) scores val with eval's metrics, never the reverse
}


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import statement in `path`, relative imports resolved."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            # `from pipelines import probe` imports the module pipelines.probe
            out += [(node.lineno, f"{base}.{alias.name}" if base in ("pipelines", "headct") else base)
                    for alias in node.names]
    return out


def module_name(path: Path, root: Path = REPO) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def violations(paths: list[Path], rule, root: Path = REPO) -> list[str]:
    return [f"{p.relative_to(root)}:{line} imports {name}" for p in paths for line, name in imported_modules(p, root)
            if rule(module_name(p, root), name)]


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_no_job_imports_another_job_or_the_cli() -> None:
    jobs = sorted((REPO / "pipelines").glob("*.py"))
    assert len(jobs) > 10
    assert violations(jobs, lambda me, name: (_is(name, "pipelines") and name not in ("pipelines", me))
                      or _is(name, "cli")) == []


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_library_layers_import_only_downward(package: str) -> None:
    files = sorted((REPO / package.replace(".", "/")).rglob("*.py"))
    assert files
    assert violations(files, lambda me, name: any(_is(name, bad) for bad in FORBIDDEN[package])) == []


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    job = tmp_path / "pipelines" / "extract.py"
    job.parent.mkdir()
    job.write_text("import numpy\n\ndef f():\n    from pipelines.probe import run\n    from . import fewshot\n")
    found = violations([job], lambda me, name: _is(name, "pipelines") and name not in ("pipelines", me), tmp_path)
    assert found == ["pipelines/extract.py:4 imports pipelines.probe", "pipelines/extract.py:5 imports pipelines.fewshot"]


def test_no_test_module_imports_another() -> None:
    """Fixture builders live in helper modules (tests/*_helpers.py, dicom_factory.py, ...), never in a test module
    another one imports: importing a test module also collects its tests twice and ties unrelated files."""
    files = sorted((REPO / "tests").glob("*.py"))
    assert len(files) > 20

    def imports_a_test_module(me: str, name: str) -> bool:
        leaf = name.removeprefix("tests.")
        return "." not in leaf and leaf.startswith("test_") and leaf != me.removeprefix("tests.")

    assert violations(files, imports_a_test_module) == []
