"""Print what is visible at the grid: the oracle's and the HU-histogram baseline's test AUROC per label and
severity stratum, with patient-bootstrap 95% CIs (headct/eval/learnability.py), for a store built from the
synthetic generator and its split files.

    python scripts/learnability.py --store data/store/synth --splits data/splits/synth [--labels ICH SDH ...]
        [--bootstrap 1000] [--seed 0] [--json out.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_LABELS = ("ICH", "IPH", "IVH", "SDH", "EDH", "SAH", "ChronicBleed", "Fracture", "Tumor")


def main(argv: list[str] | None = None) -> int:
    from headct.errors import InputError
    from headct.eval.learnability import format_table, learnability
    from headct.io import write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--labels", nargs="+", default=list(DEFAULT_LABELS))
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    try:
        report = learnability(args.store, args.splits, args.labels, args.bootstrap, args.seed)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
