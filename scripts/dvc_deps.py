"""Derive each DVC stage's code dependencies from the imports; report where dvc.yaml differs, or rewrite it.

A stage whose cmd is ``headct <command>`` runs the job(s) that cli.py's ``<command>`` passes to ``_run_job``,
i.e. ``pipelines/<job>.py``. Its code deps are the ``headct/`` and ``pipelines/`` .py files that module imports,
transitively, read from the source (AST) without importing anything; imports inside functions count (the jobs
import their heavy modules there). Rules:

- ``import a.b.c`` and ``from a.b import c`` (``c`` a submodule) mean the file of ``a.b.c``;
  ``from a.b import NAME`` (``NAME`` defined in the package) means ``a/b/__init__.py``; relative imports alike.
- A package's ``__init__.py`` counts only when something is imported from it by name, not when one of its
  submodules is: Python runs it then too, but here it holds docstrings and re-exports (``headct/config/__init__``
  re-exports every section; counting it would tie every stage to every config module). A folder dep that also
  covers such an ``__init__.py`` is therefore not "extra".
- cli.py, the entry of every stage, is not derived (it validates every section, so it would tie every stage to
  all config). Dynamic imports (importlib) are not seen: cli.py's ``_run_job`` is read for the job mapping, and
  the external-encoder plugins are the user's code.

In dvc.yaml, a dep under ``headct/`` or ``pipelines/`` that is a .py file or a folder is a code dep (a folder
covers the .py files under it); every other dep (data, models, params/tuned/...) is kept as written.
``--write`` replaces a stage's code deps by the derived set, written as a folder where every .py file under the
folder is derived (or a package ``__init__``), else file by file, after the stage's other deps; comments and all
other lines of dvc.yaml are kept. Without ``--write``, differences are printed and the exit code is 1.

    python scripts/dvc_deps.py            # check
    python scripts/dvc_deps.py --write    # rewrite the stale stages' code deps in place
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
CODE_ROOTS = ("headct", "pipelines")  # top-level packages whose files are derived deps
FIX_COMMAND = "python scripts/dvc_deps.py --write"


class DepsError(ValueError):
    """dvc.yaml or cli.py cannot be read the way this script needs; the message names the file and reason."""


# ------------------------------------------------------------------------------------------------ imports
def _module_file(root: Path, dotted: str) -> Path | None:
    """The file of an in-repo module (``a/b.py`` or ``a/b/__init__.py``), else None (third-party, stdlib)."""
    parts = dotted.split(".")
    if parts[0] not in CODE_ROOTS:
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_files(root: Path, path: Path) -> set[Path]:
    """The in-repo module files `path` imports directly (anywhere in the file, functions included)."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except (OSError, SyntaxError) as exc:
        raise DepsError(f"{path}: cannot parse ({exc})") from None
    own = _module_name(root, path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: set[Path] = set()
    # Imports under `if TYPE_CHECKING:` never run, so they are no dependency of the stage.
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and (getattr(node.test, "id", None) == "TYPE_CHECKING"
                                         or getattr(node.test, "attr", None) == "TYPE_CHECKING")
        for stmt in node.body for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _module_file(root, alias.name)
                if target is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x`, `from ..a import b`
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = _module_file(root, f"{base}.{alias.name}") if alias.name != "*" else None
                target = submodule or _module_file(root, base)
                if target is not None:
                    found.add(target)
    return found


def closure(root: Path, start: Path) -> set[Path]:
    """`start` and every in-repo module file it imports, transitively."""
    seen: set[Path] = set()
    todo = [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(imported_files(root, path) - seen)
    return seen


# --------------------------------------------------------------------------------------------- cli mapping
def command_jobs(cli_path: Path) -> dict[str, set[str]]:
    """cli.py's commands -> the job names their bodies pass to `_run_job` (literal first argument)."""
    try:
        tree = ast.parse(cli_path.read_text(), filename=str(cli_path))
    except (OSError, SyntaxError) as exc:
        raise DepsError(f"{cli_path}: cannot parse ({exc})") from None
    jobs: dict[str, set[str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
                    and deco.func.attr == "command" and isinstance(deco.func.value, ast.Name)
                    and deco.func.value.id == "app"):
                continue
            name = node.name.replace("_", "-")  # Typer's default command name
            given = [a for a in deco.args[:1] if isinstance(a, ast.Constant)]
            given += [k.value for k in deco.keywords if k.arg == "name" and isinstance(k.value, ast.Constant)]
            if given:
                name = str(given[0].value)
            jobs[name] = {
                call.args[0].value
                for call in ast.walk(node)
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_run_job"
                and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)
            }
    return jobs


# ----------------------------------------------------------------------------------------------- the check
@dataclass
class StageDiff:
    stage: str
    missing: list[str]  # derived files no code dep covers
    extra: list[str]  # code deps (or files a folder dep covers) the job does not import
    wanted: list[str]  # the canonical code deps


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _is_code_dep(root: Path, dep: str) -> bool:
    first = dep.split("/", 1)[0]
    return first in CODE_ROOTS and (dep.endswith(".py") or (root / dep).is_dir() or not (root / dep).exists())


def _python_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def _canonical(root: Path, derived: set[Path], allowed: set[Path]) -> list[str]:
    """The fewest deps covering `derived`: a folder where every .py under it is allowed, else single files."""
    deps: list[str] = []

    def visit(folder: Path) -> None:
        inside = {p for p in derived if folder in p.parents}
        if not inside:
            return
        if folder.parent != root and _python_files(folder) <= allowed:
            deps.append(_rel(root, folder))
            return
        deps.extend(_rel(root, p) for p in sorted(inside) if p.parent == folder)
        for sub in sorted(d for d in folder.iterdir() if d.is_dir() and d.name != "__pycache__"):
            visit(sub)

    for top in CODE_ROOTS:
        visit(root / top)
    return sorted(deps)


def derive(root: Path, stages: dict[str, dict]) -> dict[str, tuple[set[Path], set[Path]]]:
    """Stage -> (derived files, allowed files: derived + the package __init__.py files above them)."""
    jobs = command_jobs(root / "cli.py")
    out: dict[str, tuple[set[Path], set[Path]]] = {}
    for stage, spec in stages.items():
        cmd = spec.get("cmd") if isinstance(spec, dict) else None
        words = cmd.split() if isinstance(cmd, str) else []
        if words[:1] != ["headct"]:
            continue
        if len(words) < 2 or words[1] not in jobs:
            raise DepsError(f"dvc.yaml: stage {stage!r}: {cmd!r} names no command of cli.py "
                            f"(commands: {', '.join(sorted(jobs))})")
        if not jobs[words[1]]:
            raise DepsError(f"cli.py: command {words[1]!r} (stage {stage!r}) calls no _run_job('<job>')")
        derived: set[Path] = set()
        for job in sorted(jobs[words[1]]):
            module = root / "pipelines" / f"{job}.py"
            if not module.is_file():
                raise DepsError(f"cli.py: command {words[1]!r} runs job {job!r}, but {_rel(root, module)} is missing")
            derived |= closure(root, module)
        allowed = set(derived)
        for path in derived:
            allowed.update(p / "__init__.py" for p in path.parents if root in p.parents)
        out[stage] = (derived, {p for p in allowed if p.is_file()})
    return out


def load_stages(text: str, source: str) -> dict[str, dict]:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DepsError(f"{source}: not valid YAML ({exc})") from None
    stages = loaded.get("stages") if isinstance(loaded, dict) else None
    if not isinstance(stages, dict):
        raise DepsError(f"{source}: expected a mapping under the key 'stages'")
    return stages


def compare(root: Path, text: str, source: str = "dvc.yaml") -> list[StageDiff]:
    """Every stage whose code deps differ from the derived ones (none: dvc.yaml is current)."""
    stages = load_stages(text, source)
    diffs = []
    for stage, (derived, allowed) in derive(root, stages).items():
        deps = [str(d) for d in stages[stage].get("deps") or []]
        code = [d for d in deps if _is_code_dep(root, d)]
        covered: set[Path] = set()
        extra: list[str] = []
        for dep in code:
            path = root / dep
            if path.is_dir():
                files = _python_files(path)
                covered |= files
                extra += [f"{_rel(root, p)} (in folder dep {dep})" for p in sorted(files - allowed)]
            elif path.is_file():
                covered.add(path)
                if path not in allowed:
                    extra.append(dep)
            else:
                extra.append(f"{dep} (does not exist)")
        missing = sorted(_rel(root, p) for p in derived - covered)
        if missing or extra:
            diffs.append(StageDiff(stage, missing, extra, _canonical(root, derived, allowed)))
    return diffs


def describe(diffs: list[StageDiff], source: str = "dvc.yaml") -> str:
    lines = [f"{source}: code deps differ from what the jobs import:"]
    for d in diffs:
        lines += [f"  stage {d.stage}: missing {m}" for m in d.missing]
        lines += [f"  stage {d.stage}: extra {e}" for e in d.extra]
    lines.append(f"fix: {FIX_COMMAND}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- rewriting
def rewrite(root: Path, text: str, diffs: list[StageDiff], source: str = "dvc.yaml") -> str:
    """`text` with each stale stage's code deps replaced by its canonical ones (after its other deps)."""
    lines = text.splitlines(keepends=True)
    for diff in diffs:
        start = _find_block(lines, diff.stage, source)
        deps_indent = len(lines[start]) - len(lines[start].lstrip())
        end = start + 1
        while end < len(lines) and (not lines[end].strip() or lines[end].lstrip().startswith("#")
                                    or len(lines[end]) - len(lines[end].lstrip()) > deps_indent):
            end += 1
        # Blank lines and comments after the list (at the key's indent or less) belong to what follows.
        while end > start + 1 and (not lines[end - 1].strip() or (
                lines[end - 1].lstrip().startswith("#")
                and len(lines[end - 1]) - len(lines[end - 1].lstrip()) <= deps_indent)):
            end -= 1
        block = lines[start + 1:end]
        items = [ln for ln in block if ln.lstrip().startswith("- ")]
        if not items:
            raise DepsError(f"{source}: stage {diff.stage!r}: its deps are not a block list ('- path' lines)")
        item_indent = items[0][: len(items[0]) - len(items[0].lstrip())]
        kept = [ln for ln in block if not (ln.lstrip().startswith("- ")
                                           and _is_code_dep(root, ln.strip()[2:].strip().strip("'\"")))]
        kept += [f"{item_indent}- {dep}\n" for dep in diff.wanted]
        lines[start + 1:end] = kept
    new = "".join(lines)
    _verify(root, text, new, {d.stage: d.wanted for d in diffs}, source)
    return new


def _find_block(lines: list[str], stage: str, source: str) -> int:
    """Index of the `deps:` line of `stage` (a key under the top-level `stages:`)."""
    in_stages, key_indent, current = False, None, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            in_stages, key_indent, current = stripped == "stages:", None, None
        elif in_stages:
            key_indent = indent if key_indent is None else key_indent
            if indent == key_indent:
                current = stripped[:-1].strip() if stripped.endswith(":") else None
            elif current == stage and stripped == "deps:":
                return i
    raise DepsError(f"{source}: stage {stage!r} has no 'deps:' block list to rewrite")


def _verify(root: Path, old: str, new: str, wanted: dict[str, list[str]], source: str) -> None:
    """The rewrite changed exactly the code deps of the stale stages, nothing else."""
    before, after = yaml.safe_load(old), yaml.safe_load(new)
    for stage, code in wanted.items():
        deps = before["stages"][stage].get("deps") or []
        before["stages"][stage]["deps"] = [d for d in deps if not _is_code_dep(root, str(d))] + code
    if before != after:
        raise DepsError(f"{source}: internal error, the rewrite would change more than the code deps; not written")


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the stale stages' code deps in dvc.yaml")
    parser.add_argument("--root", type=Path, default=REPO, help="project root (default: this repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    dvc_yaml = root / "dvc.yaml"
    try:
        text = dvc_yaml.read_text()
        diffs = compare(root, text, str(dvc_yaml))
        if not diffs:
            print(f"{dvc_yaml}: every stage's code deps match its imports")
            return 0
        print(describe(diffs, str(dvc_yaml)))
        if not args.write:
            return 1
        write_atomic(dvc_yaml, rewrite(root, text, diffs, str(dvc_yaml)))
        print(f"rewrote the code deps of {', '.join(d.stage for d in diffs)} in {dvc_yaml}")
        return 0
    except (OSError, DepsError) as exc:
        print(f"dvc_deps: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
