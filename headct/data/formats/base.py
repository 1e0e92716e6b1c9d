"""The protocol every input format implements, and what it hands to discovery, QC and conversion.

A format is an object (one instance per format, picklable: worker processes receive it) that can
    claims(probe)        say cheaply, from the file's name or first bytes, that a file may be one of its own
    read(probe)          read that file's headers (no pixels) as SliceHeaders, say why it is unusable, or that it
                         is an index to skip; or None: not this format after all (the next claimer is asked)
    header_qc(...)       run its own header checks on a series: a rejection (QcResult) or the StackGeometry, on
                         which selection then runs the shared geometry checks (headct.data.qc.geometry_checks)
    load_hu(...)         read the pixels of a series as float32 HU in stack order (N, rows, cols)
    patient_key(...)     the patient's source key and where it came from ("dicom" | "dataset" | "self")
    source_bytes(series) the peak bytes of reading the series (float32 stack + any decode buffer)
and has a `name` (registry key, e.g. "enhanced_ct"), a `source_format` (the manifest's value, e.g. "dicom") and
a `label` (how an unreadable file of it is described: "unreadable <label> (...)").
Formats are registered in one list, `headct.data.formats.FORMATS`; nothing else branches on a format.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from headct.config.data import QcRules
from headct.data.criteria import Criteria
from headct.data.qc import QcResult
from headct.data.series import Series, SliceHeader, StackGeometry
from headct.errors import InputError

HEAD_BYTES = 132  # enough for the DICOM Part 10 preamble (128 bytes) and its `DICM` magic


class Probe:
    """One file under discovery: its path, its first bytes (read once, on demand) and a memo where formats
    share work on it (e.g. one parsed DICOM header for the two DICOM formats)."""

    def __init__(self, path: Path, src: Path | None = None) -> None:
        self.path = path
        self.src = src  # the folder being ingested (None: unknown; names relative to it then fall back)
        self._head: bytes | None = None
        self._memo: dict[str, Any] = {}

    @property
    def head(self) -> bytes:
        """The first HEAD_BYTES bytes of the file (fewer for a short file)."""
        if self._head is None:
            with open(self.path, "rb") as fh:
                self._head = fh.read(HEAD_BYTES)
        return self._head

    @property
    def relative(self) -> Path:
        """The path under SRC, or the file name when SRC is unknown or does not hold the file."""
        if self.src is not None and self.path.is_relative_to(self.src):
            return self.path.relative_to(self.src)
        return Path(self.path.name)

    def memo(self, key: str, make: Callable[[], Any]) -> Any:
        """make() once per file and key; an exception is not remembered (it propagates to discovery)."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]


@dataclass(frozen=True)
class FileRead:
    """What a format found in one file: slice headers, or why the file is unusable, or an index to skip."""

    headers: tuple[SliceHeader, ...] = ()
    problem: str = ""  # why the file cannot be used (terminal only: it is reported with its path)
    index: bool = False  # a media index (DICOMDIR): recognised, counted and skipped


class SourceDataError(InputError):
    """The pixels of a chosen series cannot become HU; the next-ranked series of the study is tried.

    str(exc) names the file (terminal only); `why` carries no path or UID (for rejects.csv); `reason` is the
    reject code (docs/contracts.md).
    """

    reason: ClassVar[str] = "unreadable"

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path, self.why = path, why


class InputFormat(abc.ABC):
    """One input format (module docstring). Subclasses set the three names and implement the methods."""

    name: ClassVar[str]
    source_format: ClassVar[str]
    label: ClassVar[str]

    @abc.abstractmethod
    def claims(self, probe: Probe) -> bool:
        """Cheap: may this file be one of ours (name, first bytes)? Raising reports the file as unreadable."""

    @abc.abstractmethod
    def read(self, probe: Probe) -> FileRead | None:
        """Headers of a claimed file (format set to self.name), or None when it is not ours after all."""

    @abc.abstractmethod
    def header_qc(self, series: Series, rules: QcRules, criteria: Criteria | None) -> QcResult | StackGeometry:
        """This format's checks of one series, in order (first failure wins), else its stack geometry."""

    @abc.abstractmethod
    def load_hu(self, series: Series, geometry: StackGeometry, pad_hu: float) -> np.ndarray:
        """(N, rows, cols) float32 HU in stack order (geometry.order); SourceDataError when they cannot be had."""

    @abc.abstractmethod
    def patient_key(self, series: Series, mode: str, src: Path) -> tuple[str | None, str]:
        """(patient key or None, patient_key_source) under `ingest.patient_key` = mode ("dicom" | "cq500_folder")."""

    @abc.abstractmethod
    def source_bytes(self, series: Series) -> int:
        """Peak bytes of `load_hu` on this series: the float32 stack plus what decoding holds at once."""

    def __repr__(self) -> str:
        return f"<input format {self.name}>"


def top_folder_word(path: Path, src: Path) -> str | None:
    """The first whitespace-separated word of the top folder of `path` under SRC (`SYNCT12 SYNCT12/...` ->
    SYNCT12), or None when the file lies directly in SRC: the CQ500 layout's patient key."""
    parts = path.relative_to(src).parts
    words = parts[0].split() if len(parts) > 1 else []
    return words[0] if words else None
