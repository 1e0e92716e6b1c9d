"""A toy label source, to show that a new labels format is this one file plus `label_sources.register(SOURCE)`.

Format: a JSON object mapping StudyInstanceUID -> {canonical label: 0, 1 or null}. Study level, so every
accepted series of a study takes the study's labels.
"""

from __future__ import annotations

import json

import pandas as pd

from headct.data.label_sources.base import LabelRows, canonical_labels, labels_file
from headct.errors import InputError


class JsonStudySource:
    name = "toy_json"

    def read(self, cfg) -> LabelRows:
        path = labels_file(cfg, "labels JSON")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise InputError(f"{path}: not JSON ({exc})") from None
        raw = pd.DataFrame.from_dict(data, orient="index").astype("string")  # null -> <NA>, 1 -> "1"
        return LabelRows(path, "study", canonical_labels(path, raw))


SOURCE = JsonStudySource()
