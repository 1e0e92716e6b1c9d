"""The input formats ingest reads, registered in ONE place: `FORMATS` (protocol: headct.data.formats.base).

Order matters only for claiming a file: the first format whose `claims` and `read` accept it reads it (so the
more specific Enhanced CT comes before classic DICOM; a file no format takes is counted as "other").
To add a format: implement `InputFormat` in one module and `register()` an instance. Nothing else branches on a
format: discovery, QC, conversion, the memory estimate and the manifest ask the format of a series
(`of(series)`). Worker processes are spawned fresh, so ingest hands them the parent's list (`install`).
"""

from __future__ import annotations

from headct.data.formats.base import FileRead, InputFormat, Probe, SourceDataError
from headct.data.formats.dicom import DicomFormat
from headct.data.formats.enhanced_ct import EnhancedCtFormat
from headct.data.formats.nifti import NiftiFormat
from headct.data.series import Series

__all__ = ["FORMATS", "FileRead", "InputFormat", "Probe", "SourceDataError", "get", "install", "of", "register",
           "registered", "source_formats", "unregister"]

FORMATS: list[InputFormat] = [NiftiFormat(), EnhancedCtFormat(), DicomFormat()]


def registered() -> tuple[InputFormat, ...]:
    """The formats in claiming order (a snapshot: picklable, for worker processes)."""
    return tuple(FORMATS)


def register(fmt: InputFormat) -> None:
    """Add a format; it claims files after the ones already registered."""
    if not isinstance(fmt, InputFormat):
        raise TypeError(f"{fmt!r} does not implement headct.data.formats.base.InputFormat")
    if any(f.name == fmt.name for f in FORMATS):
        raise ValueError(f"an input format named {fmt.name!r} is already registered")
    FORMATS.append(fmt)


def unregister(name: str) -> None:
    FORMATS[:] = [f for f in FORMATS if f.name != name]


def install(formats: tuple[InputFormat, ...]) -> None:
    """Make `formats` the registry of this process (a worker: the parent's formats, in the parent's order)."""
    FORMATS[:] = list(formats)


def get(name: str) -> InputFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise KeyError(f"no input format {name!r} is registered ({', '.join(f.name for f in FORMATS)})")


def of(series: Series) -> InputFormat:
    """The format that reads `series` (the format of its headers)."""
    return get(series.format)


def source_formats() -> list[str]:
    """The manifest's `source_format` values of the registered formats, sorted (e.g. dicom, nifti)."""
    return sorted({f.source_format for f in FORMATS})
