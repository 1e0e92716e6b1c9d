"""Which labels a job evaluates, and the one `min_positives` rule that leaves a label out.

Probe, few-shot, retrieval, fine-tuning and tuning all choose their labels here, so a label is refused for the
same reason, with the same message, whichever job looks at it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from headct.errors import InputError


def requested_labels(labels: Sequence[str] | None, frames: Mapping[str, Any], split_dir: Path) -> list[str]:
    """`labels` (a job's `labels` setting), or every canonical label column of the first frame (train) when None;
    InputError naming the split file that lacks a column for one of them."""
    from headct.data.splits import label_columns

    wanted = list(labels) if labels is not None else label_columns(next(iter(frames.values())))
    for split, frame in frames.items():
        missing = [label for label in wanted if label not in frame.columns]
        if missing:
            raise InputError(f"{Path(split_dir) / f'{split}.csv'}: no column for label(s) {missing}")
    return wanted


def _known(values: Any) -> np.ndarray:
    """0/1 targets as float with NaN for unknown, from an array or a nullable pandas column."""
    if hasattr(values, "to_numpy"):
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def skip_reason(targets: Mapping[str, Any], min_positives: int, negatives: bool = True) -> str | None:
    """Why a label cannot be evaluated honestly, else None: a split with fewer than `min_positives` positives or,
    when the evaluation needs negatives too (`negatives`: an AUROC or a threshold does; retrieval's AP over
    positive queries does not), fewer than as many negatives.

    Args:
        targets: split name -> that split's targets for the label (0/1; NaN / NA = unknown, not counted), in the
            order the message should name them.
    """
    problems = []
    for split, values in targets.items():
        y = _known(values)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos < min_positives:
            problems.append(f"{split} has {n_pos} positive(s)")
        if negatives and n_neg < min_positives:
            problems.append(f"{split} has {n_neg} negative(s)")
    return f"{', '.join(problems)} (min_positives={min_positives})" if problems else None
