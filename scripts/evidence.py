"""`make evidence SEED=N`: the evidence benchmark (params-evidence.yaml) end to end for one seed.

    python scripts/evidence.py --seed N [--profile params-evidence.yaml] [--quick] [--dest DIR] [--out FILE]
        [--resume]

Lays out a throw-away workspace (default build/evidence/seed-N, deleted first unless --resume) holding only a
params.yaml: the profile without its `evidence` section, with every seed of every section derived from N (a field
`seed` or `*_seed` = N, a list field `*_seeds` = [N, 1000 N + 1, 1000 N + 2, ...]). Then it runs the chain as plain
`headct <job>` calls with this repository's code, in the workspace (its own mlflow.db, optuna.db, data, models,
reports): synth, ingest, split, learnability (oracle and HU histogram per stratum), pretrain, extract, probe,
fewshot, the supervised ceiling (`headct ceiling`: the profile's `ceiling` section), the fine-tuned arms when
`evidence.finetune_arms` (`headct tune` then `headct finetune` per arm, the same tuning budget each), and
`headct compare` when this checkout has that job. It writes a small JSON (default benchmarks/evidence/seed-N.json):
command, git commit and dirty flag, seed, the derived seeds, seconds per stage, the load average, the split's
sizes, and the AUROCs of the reported labels (probe and few-shot per model, ceiling, fine-tuned arms, compare's
verdicts). `--quick` merges `evidence.quick` over the profile: the same chain in minutes, to check the runner
(its JSON goes to build/evidence/ by default, never to benchmarks/).

Why plain `headct` calls and not `dvc repro`: the ceiling and the arms are several runs of one job with different
settings, which one DVC stage per job cannot express; DVC would copy the ~1 GB store into its cache for a workspace
that is thrown away; and each stage's wall time is measured here directly. `--resume` reruns only the stages that
have not finished or whose command changed (markers in <workspace>/.evidence/), and every stage after the first
one that runs (it may read what that one rewrote), and only when the workspace's params.yaml is unchanged: e.g.
fine-tuned arms added to a finished run (their settings are command-line --set values, not params.yaml) run the
arms and compare again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PROFILE = REPO / "params-evidence.yaml"
SECTION = "evidence"  # the runner's own section of the profile (headct's Params has no such section)
KNOWN_KEYS = {"seeds", "labels", "finetune_arms", "arms", "quick"}
MARKERS = ".evidence"


class EvidenceError(Exception):
    """A problem with the profile, the workspace or a stage: printed as one line, exit 1 (2 for the profile)."""


@dataclass
class Stage:
    name: str
    argv: list[str]  # the command line, run in the workspace


# ------------------------------------------------------------------------------------------------- profile
def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into a copy of `base`, recursively for mappings (lists and values are replaced)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_profile(path: Path, quick: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the headct params tree, the runner's `evidence` section), `evidence.quick` merged in with `quick`."""
    try:
        tree = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise EvidenceError(f"{path}: cannot read the profile ({exc})") from None
    if not isinstance(tree, dict) or not isinstance(tree.get(SECTION), dict):
        raise EvidenceError(f"{path}: no `{SECTION}:` section (seeds, labels, arms)")
    evidence = tree.pop(SECTION)
    unknown = sorted(set(evidence) - KNOWN_KEYS)
    if unknown:
        moved = " (the ceiling is now the top-level `ceiling:` section, run by `headct ceiling`)" \
            if "ceiling" in unknown else ""
        raise EvidenceError(f"{path}: unknown key(s) {unknown} in `{SECTION}:`; allowed: {sorted(KNOWN_KEYS)}{moved}")
    quick_over = evidence.pop("quick", None) or {}
    if quick:
        if not quick_over:
            raise EvidenceError(f"{path}: --quick needs an `{SECTION}.quick` section")
        evidence = merge(evidence, quick_over.pop(SECTION, {}))
        tree = merge(tree, quick_over)
    labels = evidence.get("labels")
    if not labels or not isinstance(labels, list):
        raise EvidenceError(f"{path}: `{SECTION}.labels` must list the reported labels (the first is the primary)")
    return tree, evidence


def _seed_fields(model: type, prefix: str) -> Iterator[tuple[str, str, Any]]:
    """(dotted path, kind, default) of every seed field of a config model, nested sections included."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            yield from _seed_fields(type(default), f"{prefix}{name}.")
        elif name == "seed" or name.endswith("_seed"):
            yield f"{prefix}{name}", "one", default
        elif name.endswith("_seeds") and (default is None or isinstance(default, list | tuple)):
            yield f"{prefix}{name}", "list", default


def seed_list(seed: int, length: int) -> list[int]:
    """`length` seeds derived from N: N itself, then 1000 N + 1, 1000 N + 2, ... (apart from every other derived
    seed)."""
    return [seed] + [1000 * seed + i for i in range(1, length)]


def derive_seeds(tree: dict[str, Any], seed: int) -> dict[str, Any]:
    """Set every seed of every section of `tree` from `seed` (in place); returns {dotted path: value}."""
    from headct.config.params import Params

    derived: dict[str, Any] = {}
    for path, kind, default in _seed_fields(Params, ""):
        *parents, leaf = path.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise EvidenceError(f"profile: {'.'.join(parents)} must be a section")
        if kind == "one":
            value: Any = seed
        elif node.get(leaf) is None and default is None:
            continue  # an optional seed list the profile leaves off (e.g. extract.random_init_seeds)
        else:
            # The first is N itself, so the twin named `random_init` (extract.seed = N) is among them; the others
            # 1000 N + i, apart from every other derived seed.
            value = seed_list(seed, len(node.get(leaf) or default))
        node[leaf] = derived[path] = value
    return derived


def _yaml_value(value: Any) -> str:
    """`value` as the CLI's --set parses it (YAML): flow style, e.g. [train, pool], null, 0.001, resnet18."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip().removesuffix("\n...")
    return text if yaml.safe_load(text) == value else json.dumps(value)


def _sets(section: str, values: dict[str, Any]) -> list[str]:
    """`--set section.key=value` arguments."""
    out = []
    for key, value in values.items():
        out += ["--set", f"{section}.{key}={_yaml_value(value)}"]
    return out


def plan(evidence: dict[str, Any], params: Any) -> list[Stage]:
    """The stages, in order (`params`: the workspace's validated Params, for paths and labels)."""
    stages = [Stage(job, ["headct", job]) for job in ("synth", "ingest", "split")]
    stages.append(Stage("learnability", [
        "python", "scripts/learnability.py", "--store", str(params.split.store), "--splits", str(params.split.out),
        "--labels", *evidence["labels"], "--seed", str(params.split.seed), "--json",
        "reports/learnability/metrics.json"]))
    stages += [Stage(job, ["headct", job]) for job in ("pretrain", "extract", "probe", "fewshot")]
    stages.append(Stage("ceiling", ["headct", "ceiling"]))
    runs = arm_runs(evidence, params.finetune.seed)
    for arm, settings in (evidence.get("arms") or {}).items() if runs else ():
        tuned = f"params/tuned/{arm}.yaml"  # one tuning per arm (at its first seed), shared by its runs
        for run, seed in runs[arm]:
            own = {"seed": seed, "tuned_params": tuned, "out_dir": f"models/finetune-{run}",
                   "report_dir": f"reports/finetune-{run}", "checkpoint_dir": f"checkpoints/finetune-{run}"}
            finetune = _sets("finetune", {**{k: v for k, v in settings.items() if k != "seeds"}, **own})
            if run == arm:
                tune = _sets("tune", {"best_params": tuned, "report_dir": f"reports/tune-{arm}"})
                stages.append(Stage(f"tune-{arm}", ["headct", "tune", *finetune, *tune]))
            stages.append(Stage(f"finetune-{run}", ["headct", "finetune", *finetune]))
    compare = {"finetune_predictions": {run: f"reports/finetune-{run}/predictions.csv"
                                        for arm in runs for run, _ in runs[arm]}} if runs else {}
    stages.append(Stage("compare", ["headct", "compare", *_sets("compare", compare)]))
    return stages


def arm_runs(evidence: dict[str, Any], seed: int) -> dict[str, list[tuple[str, int]]]:
    """arm -> its fine-tuning runs [(name, finetune.seed)] when `evidence.finetune_arms`, else {}. An arm with
    `seeds: k` runs k times, like extract's random-init twins: `arm` at seed N, then `arm.s<1000 N + i>`."""
    if not evidence.get("finetune_arms"):
        return {}
    out = {}
    for arm, settings in (evidence.get("arms") or {}).items():
        count = int((settings or {}).get("seeds", 1))
        if count < 1:
            raise EvidenceError(f"evidence.arms.{arm}.seeds must be >= 1")
        out[arm] = [(arm if i == 0 else f"{arm}.s{s}", s) for i, s in enumerate(seed_list(seed, count))]
    return out


# ----------------------------------------------------------------------------------------------- workspace
def environment() -> dict[str, str]:
    """This repository's code first on the path; the workspace's own MLflow store; no telemetry."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1", PYTHONDONTWRITEBYTECODE="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    return env


def command(stage: Stage) -> list[str]:
    """The stage's argv with this interpreter: `headct` is cli.py of this repository, scripts are its scripts."""
    if stage.argv[0] == "headct":
        return [sys.executable, str(REPO / "cli.py"), *stage.argv[1:]]
    return [sys.executable, str(REPO / stage.argv[1]), *stage.argv[2:]]


def prepare(dest: Path, params_text: str, resume: bool) -> None:
    """A fresh workspace with `params_text` as params.yaml, or (resume) the same one as before."""
    params = dest / "params.yaml"
    if resume and params.is_file():
        if params.read_text() != params_text:
            raise EvidenceError(f"{params}: differs from the profile's (seed, profile or --quick changed); "
                                "run without --resume to start afresh")
        return
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    params.write_text(params_text)


def run_stage(stage: Stage, dest: Path, env: dict[str, str]) -> float:
    """Run one stage in `dest`, output to logs/<stage>.log; its wall time in seconds. EvidenceError on failure,
    with the log's last lines."""
    log = dest / "logs" / f"{stage.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        out.write(f"$ {shlex.join(stage.argv)}\n")
        out.flush()
        result = subprocess.run(command(stage), cwd=dest, env=env, stdout=out, stderr=subprocess.STDOUT,
                                check=False)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise EvidenceError(f"stage {stage.name} failed (exit {result.returncode}) after {seconds:.0f} s; "
                            f"log {log}:\n{tail}")
    return seconds


# ------------------------------------------------------------------------------------------------- results
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def _auroc(entry: Any) -> dict[str, Any] | None:
    """auroc with its 95% CI (and the positives where known) from a metrics entry, or None."""
    if not isinstance(entry, dict) or "auroc" not in entry:
        return None
    return {k: _round(entry[k]) for k in ("auroc", "auroc_low", "auroc_high", "n_pos", "n_neg") if k in entry}


def collect(dest: Path, params: Any, evidence: dict[str, Any]) -> dict[str, Any]:
    """The key numbers for the reported labels from whatever reports the stages wrote."""
    labels = evidence["labels"]
    found: dict[str, Any] = {}
    split = _read_json(dest / params.split.out / "split.json")
    if split:
        counts = split["counts"]
        found["data"] = {
            "patients": {name: c["patients"] for name, c in counts.items()},
            "scans": {name: c["scans"] for name, c in counts.items()},
            "test_positive_patients": {lab: counts["test"]["positive_patients"].get(lab) for lab in labels},
            "labelled_train_positive_patients": {lab: counts["train"]["positive_patients"].get(lab)
                                                 for lab in labels},
        }
    learn = _read_json(dest / "reports/learnability/metrics.json")
    if learn:
        found["learnability"] = {model: {lab: {stratum: _auroc(cell) for stratum, cell in by_label[lab].items()}
                                         for lab in labels if lab in by_label}
                                 for model, by_label in learn["results"].items()}
    pretrain = _read_json(dest / params.pretrain.report_dir / "metrics.json")
    if pretrain:
        found["pretrain"] = {k: pretrain.get(k) for k in ("method", "heldout_loss_start", "heldout_loss_end",
                                                          "steps", "samples", "seconds", "volumes_per_s",
                                                          "train_scans")}
    probe = _read_json(dest / params.probe.report_dir / "metrics.json")
    if probe:
        found["probe"] = {model: {lab: _auroc(by_label.get(lab)) for lab in labels if lab in by_label}
                          for model, by_label in probe.items()
                          if isinstance(by_label, dict) and any(_auroc(v) for v in by_label.values())}
    fewshot = _read_json(dest / params.fewshot.report_dir / "metrics.json")
    if fewshot:
        keep = ("auroc_mean", "auroc_std", "auroc_min", "auroc_max", "auroc_n_seeds")
        found["fewshot"] = {model: {lab: {k: {key: _round(v[key]) for key in keep if key in v}
                                          for k, v in shots.items()}
                                    for lab, shots in by_label.items() if lab in labels}
                            for model, by_label in fewshot.get("results", {}).items()}
    finetuned = {"ceiling": Path(params.ceiling.report_dir)}
    for runs in arm_runs(evidence, params.finetune.seed).values():
        finetuned.update({run: Path(f"reports/finetune-{run}") for run, _ in runs})
    for name, folder in finetuned.items():
        metrics = _read_json(dest / folder / "metrics.json")
        if metrics:
            entry = {"model": metrics.get("model"), "best_epoch": metrics.get("best_epoch"),
                     "epochs": metrics.get("epochs"),
                     "best_val_auroc": {lab: round(v, 4) for lab, v in (metrics.get("best_val_auroc") or {}).items()
                                        if lab in labels},
                     "test": {lab: _auroc(metrics["labels"].get(lab)) for lab in labels
                              if lab in metrics.get("labels", {})}}
            history = _read_json(dest / folder / "history.json") or []
            entry["val_auroc_by_epoch"] = {lab: [round(h["val_auroc"][lab], 4) for h in history
                                                 if lab in h.get("val_auroc", {})] for lab in labels}
            found.setdefault("finetune", {})[name] = entry
    compare = _read_json(dest / "reports/compare/metrics.json")
    if compare is not None:
        found["compare"] = compare.get("verdicts", compare) if isinstance(compare, dict) else compare
    return found


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return result.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="N: every seed of the run is derived from it")
    parser.add_argument("--profile", type=Path, default=PROFILE)
    parser.add_argument("--quick", action="store_true", help="the profile's scaled-down variant (evidence.quick)")
    parser.add_argument("--dest", type=Path, default=None, help="workspace (default build/evidence/seed-N[-quick])")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON (default benchmarks/evidence/seed-N.json; --quick: build/evidence/)")
    parser.add_argument("--resume", action="store_true", help="keep the workspace and skip finished stages")
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/evidence.py", *(sys.argv[1:] if argv is None else argv)])
    if args.seed < 0:
        parser.error("--seed must be >= 0")
    name = f"seed-{args.seed}" + ("-quick" if args.quick else "")
    dest = (args.dest or REPO / "build" / "evidence" / name).resolve()
    out = (args.out or (REPO / "build/evidence" if args.quick else REPO / "benchmarks/evidence") / f"{name}.json")
    try:
        return _run(args, dest, out.resolve())
    except EvidenceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, dest: Path, out: Path) -> int:
    from headct.config.loader import load_params
    from headct.errors import ConfigError

    tree, evidence = load_profile(args.profile, args.quick)
    seeds = derive_seeds(tree, args.seed)
    params_text = (f"# written by scripts/evidence.py from {args.profile.name} (seed {args.seed}"
                   + (", --quick" if args.quick else "") + "); the runner's section left out\n"
                   + yaml.safe_dump(tree, sort_keys=False))
    prepare(dest, params_text, args.resume)
    try:
        params, _ = load_params(params_file=dest / "params.yaml", root=dest)
        stages = plan(evidence, params)
        for stage in stages:  # every stage's settings are checked now, not after an hour of work
            if stage.argv[0] == "headct":
                load_params(params_file=dest / "params.yaml", root=dest,
                            overrides=[a for a in stage.argv[2:] if a != "--set"])
    except (ConfigError, ValueError) as exc:
        raise EvidenceError(f"{args.profile}: not a valid headct profile: {exc}") from None
    declared = list(evidence.get("seeds") or [])
    if args.seed not in declared:
        print(f"note: seed {args.seed} is not a declared evidence seed {declared}: a tuning run")
    result: dict[str, Any] = {
        "benchmark": "evidence", "profile": args.profile.name, "quick": args.quick, "seed": args.seed,
        "declared_seed": args.seed in declared, "declared": {"seeds": declared, "labels": evidence["labels"],
                                                             "primary": evidence["labels"][0]},
        "command": args.command,
        "git": git_state(), "workspace": str(dest), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": os.cpu_count(), "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "seeds": seeds, "stages": {}, "status": "running",
    }
    earlier = _read_json(out) if args.resume else None
    if isinstance(earlier, dict) and earlier.get("workspace") == str(dest):  # the resumed stages ran with that code
        result["earlier_invocations"] = [*earlier.get("earlier_invocations", []),
                                         {k: earlier.get(k) for k in ("command", "git", "started", "status")}]
    env, markers = environment(), dest / MARKERS
    markers.mkdir(exist_ok=True)
    start = time.monotonic()
    rerun = False  # once a stage runs, every later one runs too: it may read what that stage rewrote
    try:
        for stage in stages:
            marker = markers / f"{stage.name}.json"
            done = json.loads(marker.read_text()) if args.resume and marker.is_file() and not rerun else None
            # The same command as before: a marker written before 2026-12-02 keeps none; it ran without --set.
            if done is not None and done.get("argv", "--set" not in stage.argv) in (stage.argv, True):
                result["stages"][stage.name] = {"seconds": done["seconds"], "resumed": True}
                print(f"[evidence] {stage.name}: done before, skipped")
                continue
            print(f"[evidence] {stage.name}: {shlex.join(stage.argv)}", flush=True)
            rerun = True
            seconds = run_stage(stage, dest, env)
            result["stages"][stage.name] = {"seconds": round(seconds, 1)}
            marker.write_text(json.dumps({**result["stages"][stage.name], "argv": stage.argv}))
            print(f"[evidence] {stage.name}: {seconds:.0f} s", flush=True)
        result["status"] = "ok"
    except EvidenceError as err:
        result["status"] = f"failed: {str(err).splitlines()[0]}"
        raise
    finally:
        result["seconds_total"] = round(sum(s["seconds"] for s in result["stages"].values()), 1)
        result["seconds_this_invocation"] = round(time.monotonic() - start, 1)
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        result["results"] = collect(dest, params, evidence)
        write_result(out, result)
        print(headline(result["results"], evidence["labels"][0]))
        print(f"[evidence] {result['status']}: {result['seconds_total']:.0f} s in all; wrote {out}")
    return 0


def headline(found: dict[str, Any], label: str) -> str:
    """A few lines for the terminal: the primary label's test AUROC per model, probe, few-shot and fine-tuned."""
    def cell(entry: Any) -> str:
        if not entry:
            return "-"
        ci = f" [{entry['auroc_low']:.3f}, {entry['auroc_high']:.3f}]" if entry.get("auroc_low") is not None else ""
        return f"{entry['auroc']:.3f}{ci}"

    lines = [f"{label} test AUROC [95% CI]"]
    for model, by_label in (found.get("probe") or {}).items():
        shots = (found.get("fewshot") or {}).get(model, {}).get(label, {})
        fewshot = ", ".join(f"K={k} {v['auroc_mean']:.3f}" for k, v in shots.items() if "auroc_mean" in v)
        lines.append(f"  probe {model:<18} {cell(by_label.get(label))}" + (f"; few-shot {fewshot}" if fewshot else ""))
    for name, entry in (found.get("finetune") or {}).items():
        lines.append(f"  fine-tuned {name:<13} {cell(entry['test'].get(label))}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
