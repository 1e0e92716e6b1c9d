"""Run the DVC pipeline in a throw-away workspace with another params file (`make demo-quick`, the e2e test).

The workspace is a copy of the code the stages depend on, dvc.yaml and the chosen params file (as params.yaml),
initialised with `dvc init --no-scm`; `dvc repro` then runs there exactly as it does in the repository.
With `git=True` (`--git`) it is a Git repository instead (the repository's .gitignore, one commit), which
`dvc exp run` needs: experiments are Git refs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COPIED = ("headct", "pipelines", "cli.py", "dvc.yaml", ".dvcignore")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")


GIT_ID = ("-c", "user.name=headct workspace", "-c", "user.email=workspace@headct.invalid")


def git(workspace: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *GIT_ID, *args], cwd=workspace, check=True, capture_output=True, text=True)


def make_workspace(dest: Path, params: Path, fresh: bool = False, git_repo: bool = False) -> Path:
    """Lay out `dest` as a DVC project running this repository's pipeline with `params` (a Git repository with
    one commit when `git_repo`)."""
    if fresh and dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = REPO / name
        target = dest / name
        if src.is_dir():
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(src, target, ignore=IGNORED)
        else:
            shutil.copy2(src, target)
    shutil.copy2(params, dest / "params.yaml")
    if git_repo and not (dest / ".git").is_dir():
        shutil.copy2(REPO / ".gitignore", dest / ".gitignore")
        git(dest, "init", "-q")
    if not (dest / ".dvc").is_dir():
        scm = [] if git_repo else ["--no-scm"]
        subprocess.run(["dvc", "init", *scm, "--quiet"], cwd=dest, check=True, env=dvc_env())
        for key in ("core.analytics", "core.check_update"):
            subprocess.run(["dvc", "config", key, "false"], cwd=dest, check=True, env=dvc_env())
    if git_repo:
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "--allow-empty", "-m", "workspace")
    return dest


def dvc_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace logs to its own mlflow.db
    # The stages call `headct`; make sure the one installed beside this interpreter is found first.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def repro(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", "repro"], cwd=workspace, env=dvc_env(), text=True, check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, required=True, help="params file to run with")
    parser.add_argument("--dest", type=Path, required=True, help="workspace folder")
    parser.add_argument("--fresh", action="store_true", help="delete the workspace first")
    parser.add_argument("--git", action="store_true", help="make it a Git repository (for `dvc exp run`)")
    args = parser.parse_args()
    workspace = make_workspace(args.dest.resolve(), args.params.resolve(), fresh=args.fresh, git_repo=args.git)
    result = repro(workspace)
    if result.returncode == 0 and (workspace / "reports/report/results.md").is_file():
        print((workspace / "reports/report/results.md").read_text())
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
