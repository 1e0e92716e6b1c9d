"""The header values ingest reads from every DICOM file, read from pydicom's raw elements where that is plain.

pydicom parses a header into raw elements (tag, VR, the value's bytes) and converts one into a Python value on
first access: character-set decoding, validation, DSfloat / IS / UID / MultiValue objects. For the ~25 values a
slice header needs that conversion was half of discovery's time (issue 16). For the common case, an element read
with an explicit VR in little-endian order whose VR is the one the dictionary gives, and whose bytes are printable
ASCII followed by nothing but the usual padding (spaces, NULs), the result is computed here from the bytes:
    text     (CS, UI, LO, SH)  the value without its padding, split at backslashes, each part stripped, joined
                               back with backslashes (exactly what `text` makes of pydicom's str or MultiValue);
                               LO and SH only under a character set that decodes printable ASCII as ASCII
    number   (DS)              float() of the one value, when it is a plain decimal number
    floats   (DS)              float() of each of the n values, when there are n plain decimal numbers
    integer  (US, IS)          the 16-bit unsigned value (US of 2 bytes), or int() of a plain integer string (IS)
These are the numbers and strings pydicom's conversion yields for such bytes (Python's float() and int() parse
them in both cases). Everything else (implicit VR, another VR, other bytes, other value counts, an element pydicom
has already converted) goes through pydicom exactly as before, errors included. pydicom's reading validation
(which only warns) is not run for the values read here. tests/test_dicom_values.py compares both on every file of
the tests' corpora.
"""

from __future__ import annotations

import re
from typing import Any

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue

_PLAIN = re.compile(rb"[\x20-\x7e]+[\x00 ]*\Z")  # printable ASCII, then padding only
_NUMBER = re.compile(r" *[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)? *\Z")
_INTEGER = re.compile(r" *[-+]?\d{1,12} *\Z")
# Character sets (SpecificCharacterSet, one value) whose Python codecs decode printable ASCII as ASCII; under any
# other (ISO 2022 code extensions, several values) LO and SH go through pydicom
_ASCII_CHARSETS = frozenset({"", "ISO_IR 6", "ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 126",
                             "ISO_IR 127", "ISO_IR 138", "ISO_IR 144", "ISO_IR 148", "ISO_IR 203", "ISO_IR 166",
                             "ISO_IR 192", "GB18030", "GBK"})
_CHARSET = 0x00080005
_TAGS: dict[str, tuple[int, str]] = {}


def _tag(keyword: str) -> tuple[int, str]:
    """(tag, dictionary VR) of a keyword, looked up once."""
    found = _TAGS.get(keyword)
    if found is None:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise KeyError(f"{keyword!r} is not a DICOM keyword")
        found = _TAGS[keyword] = (tag, dictionary_VR(tag))
    return found


def _raw(item: pydicom.Dataset, tag: int, vr: str) -> bytes | None:
    """The bytes of `tag` when it is an unconverted element read with the explicit VR `vr`, little endian."""
    raw = item._dict.get(tag)
    if (not isinstance(raw, RawDataElement) or vr != raw.VR or raw.is_implicit_VR or not raw.is_little_endian
            or not isinstance(raw.value, bytes)):
        return None
    return raw.value


def _plain(item: pydicom.Dataset, tag: int, vr: str) -> str | None:
    """The value of `tag` as ASCII text (padding included) when it is a plain raw element of VR `vr`, else None."""
    raw = _raw(item, tag, vr)
    return raw.decode("ascii") if raw is not None and _PLAIN.match(raw) else None


def ascii_charset(ds: pydicom.Dataset) -> bool:
    """True when the dataset's character set decodes printable ASCII bytes as ASCII (LO and SH may be read here)."""
    if _CHARSET not in ds._dict:
        return True
    value = ds.get("SpecificCharacterSet")  # converted by pydicom while reading, to decode the dataset's text
    return value is None or (isinstance(value, str) and value.strip() in _ASCII_CHARSETS)


def _converted_text(item: pydicom.Dataset, keyword: str) -> str:
    value = item.get(keyword)
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v).strip() for v in value)
    return str(value).strip()


def text(item: pydicom.Dataset, keyword: str, ascii_ok: bool | None = None) -> str:
    """The element's text, multiple values joined with backslashes, "" when absent (`ascii_ok`: ascii_charset(item)
    when known)."""
    tag, vr = _tag(keyword)
    value = _plain(item, tag, vr) if vr in ("CS", "UI", "LO", "SH") else None
    if value is not None and vr in ("LO", "SH") and not (ascii_charset(item) if ascii_ok is None else ascii_ok):
        value = None
    if value is None:
        return _converted_text(item, keyword)
    return "\\".join(part.strip() for part in value.rstrip("\0 ").split("\\"))


def number(item: pydicom.Dataset, keyword: str) -> float | None:
    """A single DS value as a float, or None when absent, empty, several or not a number."""
    tag, vr = _tag(keyword)
    value = _plain(item, tag, vr) if vr == "DS" else None
    if value is not None and _NUMBER.match(value := value.rstrip("\0 ").strip()):
        return float(value)
    value = item.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def floats(item: pydicom.Dataset | None, keyword: str, n: int) -> tuple[float, ...] | None:
    """`n` floats from a multi-valued attribute of `item` (a dataset or a functional-group item), or None
    when the item, the attribute or a number in it is missing or malformed."""
    if item is None:
        return None
    tag, vr = _tag(keyword)
    value = _plain(item, tag, vr) if vr == "DS" and n > 1 else None
    if value is not None:
        parts = value.rstrip("\0 ").strip().split("\\")
        if len(parts) == n and all(_NUMBER.match(p) for p in parts):
            return tuple(float(p) for p in parts)
    value = item.get(keyword)
    if value is None or len(value) != n:
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def integer(item: pydicom.Dataset, keyword: str) -> Any:
    """A US or IS value as an int; absent: None; anything else: pydicom's value (the caller converts it)."""
    tag, vr = _tag(keyword)
    raw = _raw(item, tag, vr) if vr == "US" else None
    if raw is not None and len(raw) == 2:
        return int.from_bytes(raw, "little")
    if vr == "IS" and (value := _plain(item, tag, vr)) is not None and _INTEGER.match(value := value.rstrip("\0 ")):
        return int(value)
    return item.get(keyword)


def us_value(ds: pydicom.Dataset, tag: int) -> int | None:
    """A single US value (2 bytes) read from its raw element, or None when it is not one (pydicom converts it)."""
    raw = _raw(ds, tag, "US")
    return int.from_bytes(raw, "little") if raw is not None and len(raw) == 2 else None


def cs_value(ds: pydicom.Dataset, tag: int) -> str | None:
    """A single CS value as pydicom gives it (trailing padding removed), from a plain raw element without leading
    spaces or backslashes; else None (pydicom converts it)."""
    value = _plain(ds, tag, "CS")
    return value.rstrip("\0 ") if value is not None and "\\" not in value and value[:1] != " " else None


def lo_value(ds: pydicom.Dataset, tag: int) -> Any:
    """The value pydicom gives the LO element `tag` (e.g. a private creator): a plain single value from its bytes
    (pydicom strips trailing spaces and NULs), anything else converted by pydicom."""
    value = _plain(ds, tag, "LO")
    if value is not None and "\\" not in value and ascii_charset(ds):
        return value.rstrip("\0 ")
    return ds[tag].value
