"""The pixels of a DICOM series (classic and Enhanced CT) as float32 HU, and where discovery found them.

One header parse per file (issue 16): discovery parses every header with pydicom and stops at the PixelData
element. For a single-frame file in a little-endian, not deflated transfer syntax it records there (`locate`)
the element's offset, its tag/VR/length bytes and pydicom's decoding options for the file (`as_pixel_options` of
that parse: Rows, Columns, BitsAllocated, BitsStored, PixelRepresentation ..., the transfer syntax, the element's
keyword and VR). `load_hu` then opens the file at that offset, checks that the element header there is still the
one recorded, and calls pydicom's decoder on the file positioned at the value with those options: exactly the call
`pydicom.pixels.iter_pixels` makes after parsing the header a second time, so the array is the same, bit for bit,
and so is every check the decoder makes (the value's length among them). Any other file (multi-frame, deflated,
big-endian), or one whose element header moved since discovery, is read by iter_pixels as before.

The common CT file (one frame of 16-bit grey values, one sample, uncompressed little-endian: `native_layout`)
skips even the decoder's per-call set-up, about a third of a slice's read time (issue 16): its bytes are read
straight into a buffer reused for every slice of the series, and the unused high bits (BitsStored <
BitsAllocated) are cleared by the same left and right shifts pydicom's decoder applies. What the decoder would
refuse or read otherwise (other syntaxes, bit depths, colour, several frames, out-of-range Rows/Columns) is left
to it; a file shorter than its frame is the ValueError the decoder raises for it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.pixels import as_pixel_options, get_decoder, iter_pixels
from pydicom.pixels.utils import _IMAGE_PIXEL  # the elements as_pixel_options reads, in its order
from pydicom.uid import UID

from headct.data import buffers
from headct.data.formats import dicom_values
from headct.data.formats.base import SourceDataError
from headct.data.series import Series, StackGeometry

DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PHOTOMETRIC, _NUMBER_OF_FRAMES = 0x00280004, 0x00280008
_KEYWORD_OF_TAG = {0x7FE00010: "PixelData", 0x7FE00008: "FloatPixelData", 0x7FE00009: "DoubleFloatPixelData"}


class PixelDataError(SourceDataError):
    """A file of the chosen series whose pixels cannot be turned into HU (reason `unreadable`)."""

    reason = "unreadable"


class NoPixelDataError(PixelDataError):
    """A file of the chosen series without a PixelData element (reason `no_pixel_data`)."""

    reason = "no_pixel_data"


@dataclass(frozen=True)
class PixelElement:
    """Where a single-frame file's pixel data element starts and how pydicom decodes it (SliceHeader.extra of a
    classic DICOM header; picklable)."""

    offset: int  # bytes from the start of the file to the element's tag
    head: bytes  # its tag, VR and length as found there: 8 bytes (implicit VR) or 12 (explicit VR)
    options: tuple[tuple[str, Any], ...]  # pydicom decoding options, as iter_pixels builds them


def pixel_options(ds: pydicom.Dataset, syntax: UID) -> dict[str, Any]:
    """`as_pixel_options(ds, transfer_syntax_uid=syntax)`, with the usual single-frame file's values (US and one
    CS, no NumberOfFrames) read from their raw bytes (headct.data.formats.dicom_values); anything else is pydicom's."""
    options: dict[str, Any] = {}
    for tag, attr in _IMAGE_PIXEL.items():
        if tag in ds._dict:
            value = dicom_values.cs_value(ds, tag) if tag == _PHOTOMETRIC else dicom_values.us_value(ds, tag)
            if value is None or tag == _NUMBER_OF_FRAMES:
                return as_pixel_options(ds, transfer_syntax_uid=syntax)
            options[attr] = value
    return {**options, "number_of_frames": 1, "transfer_syntax_uid": syntax}


def locate(fp: BinaryIO, ds: pydicom.Dataset, offset: int, head: bytes) -> PixelElement | None:
    """The PixelElement of a file whose header parse stopped at `offset`, where the bytes `head` (the first 12 or
    fewer) begin; None where the file is not one the direct read applies to (module docstring)."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else UID("")
    if not syntax.is_transfer_syntax or not syntax.is_little_endian or syntax == DEFLATED:
        return None
    if syntax.is_implicit_VR != ds.original_encoding[0] or len(head) < 12:
        return None  # the parse read another encoding than the syntax names: leave it to pydicom
    keyword = _KEYWORD_OF_TAG.get(int.from_bytes(head[:2], "little") << 16 | int.from_bytes(head[2:4], "little"))
    if keyword is None or 0x7FE00001 in ds._dict:  # an extended offset table: iter_pixels reads it
        return None
    try:
        options = pixel_options(ds, syntax)
    except Exception:  # a malformed image-pixel element: iter_pixels names the problem when pixels are read
        return None
    if options.get("number_of_frames") != 1 or not all(isinstance(v, int | str) for v in options.values()):
        return None
    options["pixel_keyword"] = keyword
    if not syntax.is_implicit_VR:
        options["pixel_vr"] = head[4:6].decode("latin-1")
    return PixelElement(offset, bytes(head[: 8 if syntax.is_implicit_VR else 12]), tuple(options.items()))


def _direct(path: Path, element: PixelElement) -> Iterator[np.ndarray] | None:
    """The file's one frame through pydicom's decoder, read at the recorded offset; None when the element header
    found there is not the recorded one (the file changed since discovery)."""
    fh = open(path, "rb")  # noqa: SIM115 - closed by the generator below, or here
    try:
        fh.seek(element.offset)
        if fh.read(len(element.head)) != element.head:
            fh.close()
            return None
    except BaseException:
        fh.close()
        raise
    options = dict(element.options)

    def frames() -> Iterator[np.ndarray]:
        with fh:
            for arr, _ in get_decoder(options["transfer_syntax_uid"]).iter_array(fh, validate=True, **options):
                yield arr

    return frames()


NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit / Explicit VR Little Endian


def native_layout(options: dict[str, Any]) -> tuple[np.dtype, int] | None:
    """(dtype, unused high bits) of a frame that pydicom's decoder returns exactly as stored (bar the unused-bit
    correction), or None: one frame of 16-bit MONOCHROME1/2 values, one sample, uncompressed little endian, and
    values its option validation accepts (`Decoder.iter_array(validate=True)`)."""
    if (options.get("transfer_syntax_uid") not in NATIVE_SYNTAXES or options.get("pixel_keyword") != "PixelData"
            or options.get("photometric_interpretation") not in ("MONOCHROME1", "MONOCHROME2")):
        return None
    values = [options.get(k) for k in ("samples_per_pixel", "number_of_frames", "bits_allocated",
                                        "pixel_representation", "bits_stored", "rows", "columns")]
    if not all(type(v) is int for v in values):
        return None
    samples, frames, allocated, signed, stored, rows, cols = values
    if (samples, frames, allocated) != (1, 1, 16) or signed not in (0, 1) or not 1 <= stored <= 16:
        return None
    if not (0 < rows <= 0xFFFF and 0 < cols <= 0xFFFF):
        return None
    return np.dtype("<i2" if signed else "<u2"), 16 - stored


def _read_native(path: Path, element: PixelElement, unused_bits: int, out: np.ndarray) -> bool:
    """The file's frame into `out` (rows x cols of the layout's dtype), as pydicom's decoder gives it; False when
    the element header found at the recorded offset is not the recorded one (the file changed since discovery)."""
    with open(path, "rb", buffering=0) as fh:
        fh.seek(element.offset)
        if fh.read(len(element.head)) != element.head:
            return False
        view, done = memoryview(out).cast("B"), 0
        while done < len(view) and (n := fh.readinto(view[done:])):
            done += n
    if done < len(view):  # what reshaping the decoder's short read raises
        raise ValueError(f"{done} bytes of pixel data where a frame needs {len(view)}")
    if unused_bits:  # pydicom's _correct_unused_bits: shift the unused bits out and back (sign-extending)
        np.left_shift(out, unused_bits, out=out)
        np.right_shift(out, unused_bits, out=out)
    return True


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """out = float32(stored) * float32(slope) + float32(intercept), rounded as those three float32 steps are.
    Stored integers of up to 16 bits are exact in float32, so the cast folds into the first operation (and a slope
    of 1 is no operation at all); wider ones are cast first (their cast rounds)."""
    if stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2:
        if slope == 1.0:
            np.add(stored, np.float32(intercept), out=out)
            return
        np.multiply(stored, np.float32(slope), out=out)
    else:
        out[...] = stored
        out *= np.float32(slope)
    out += np.float32(intercept)


def load_hu(series: Series, geometry: StackGeometry, pad_hu: float = -1024.0) -> np.ndarray:
    """(N, rows, cols) float32 HU in stack order.

    HU = stored * RescaleSlope + RescaleIntercept per slice (per frame for Enhanced CT), computed in float32
    one slice at a time (no float64 copy of the stack). Stored values inside the pixel-padding range are set to
    `pad_hu` first (air), so the outside of the reconstruction circle (often -2000 or -3024 HU) never blends
    into the head when resampled. Compressed transfer syntaxes are decoded by pydicom's pixel plugins
    (pylibjpeg: JPEG, JPEG-LS, JPEG 2000; RLE and deflate natively). Peak memory: this stack (4 bytes x rows x
    cols x slices) plus one file's decoded pixels (all frames of an uncompressed multi-frame object).
    """
    hu = buffers.stack((geometry.n_slices, geometry.rows, geometry.cols))  # every slice is written below
    wanted: dict[Path, dict[int, int]] = defaultdict(dict)  # file -> frame -> stack position
    for k, index in enumerate(geometry.order):
        header = series.slices[index]
        wanted[header.path][header.frame] = k
    frame_buffers: dict[tuple[np.dtype, int, int], np.ndarray] = {}  # one per layout, reused file after file
    for path, frames in wanted.items():
        header = series.slices[geometry.order[next(iter(frames.values()))]]
        if header.rescale is None:
            raise PixelDataError(path, "no RescaleSlope/RescaleIntercept, so HU cannot be derived")
        ds = pydicom.Dataset()  # filled with the file's non-pixel elements by iter_pixels
        indices = sorted(frames) if header.frames > 1 else None
        try:
            if header.pixel_bytes == 0:
                raise NoPixelDataError(path, "the file has no PixelData element")
            arrays = None
            if isinstance(header.extra, PixelElement):
                options = dict(header.extra.options)
                layout = native_layout(options)
                if layout is not None:
                    key = (layout[0], options["rows"], options["columns"])
                    if key not in frame_buffers:
                        frame_buffers[key] = np.empty(key[1:], key[0])
                    if _read_native(path, header.extra, layout[1], frame_buffers[key]):
                        arrays = iter([frame_buffers[key]])
                else:
                    arrays = _direct(path, header.extra)
            if arrays is None:
                # iter_pixels reads pixel data straight from the file, except from a deflated one (the whole
                # dataset is zlib-compressed): that is inflated by dcmread first
                source = pydicom.dcmread(path) if header.transfer_syntax == DEFLATED else path
                if isinstance(source, pydicom.Dataset) and not any(k in source for k in PIXEL_KEYWORDS):
                    raise NoPixelDataError(path, "the file has no PixelData element")
                arrays = iter_pixels(source, ds_out=ds, indices=indices)
            for frame, stored in zip(indices or [0], arrays, strict=True):
                if stored.shape != (geometry.rows, geometry.cols):
                    raise PixelDataError(path, f"pixel array {stored.shape} differs from Rows/Columns of the series")
                k = frames[frame]
                slope, intercept = series.slices[geometry.order[k]].rescale or header.rescale
                _rescale_into(hu[k], stored, slope, intercept)
                if header.padding is not None:
                    lo, hi = header.padding
                    hu[k][(stored >= lo) & (stored <= hi)] = pad_hu
        except PixelDataError:
            raise
        except Exception as exc:  # pydicom raises many types for undecodable data; all mean "unreadable"
            syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID") or (
                pydicom.uid.UID(header.transfer_syntax) if header.transfer_syntax else None)
            name = getattr(syntax, "name", "unknown transfer syntax")
            raise PixelDataError(path, f"pixel data could not be decoded ({type(exc).__name__}; {name})") from exc
    return hu
