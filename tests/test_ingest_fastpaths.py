"""Ingest's fast paths (issue 16) give what the paths they replace give, on every input the tests can make.

- header values read from pydicom's raw elements (headct.data.formats.dicom_values) == pydicom's conversion,
  errors included, over the hostile corpus, the factory's storage variants, `headct synth` files and crafted
  values (padding, NULs, signs, exponents, several values, non-ASCII text, other character sets, implicit VR);
- the synthetic marker found without pydicom's private-block slicing == `get_private_item`;
- pixels read at the offset discovery recorded == pydicom's iter_pixels (also when the file changed since), and
  plain 16-bit frames read straight into a buffer == pydicom's decoder (unused bits, signs, truncated files);
- separable resampling of axis-aligned stacks == the general resampler, for every flip and axis order;
- the in-plane opening == scipy's binary_opening; the content hash's striped copy == a plain copy.
The store-level check (every output byte against the code before these paths) is tests/test_ingest_golden.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_corpus  # noqa: E402
from dicom_factory import SeriesSpec, slice_positions, write_enhanced, write_series  # noqa: E402

from headct.config import PreprocessSpec, QcRules, SynthConfig  # noqa: E402
from headct.data import dedup, formats, resample  # noqa: E402
from headct.data.discovery import group_series, list_files, read_headers  # noqa: E402
from headct.data.formats import dicom, dicom_pixels, dicom_values  # noqa: E402
from headct.data.series import LPS_TO_RAS, StackGeometry, stack_geometry  # noqa: E402
from headct.data.synth import marker  # noqa: E402

# the corpus writes an ASCII placeholder under ISO 2022 IR 87 before patching in the value under test
pytestmark = pytest.mark.filterwarnings("ignore:Failed to encode value with encodings")


# ------------------------------------------------------------------------------------------------ corpus
def _patch(path: Path, old: bytes, new: bytes) -> None:
    """Replace the one occurrence of `old` in the file by `new` of the same length (a raw header value)."""
    data = path.read_bytes()
    assert len(old) == len(new) and data.count(old) == 1, (path, old)
    path.write_bytes(data.replace(old, new))


# (keyword, placeholder written by pydicom, raw bytes put in its place): values pydicom reads in its own ways
CRAFTED = [
    ("SliceThickness", "9.9999", b" 1.25 "), ("SliceThickness", "9.9999", b"1.25\0\0"),
    ("SliceThickness", "9.9999", b"+.5e1 "), ("SliceThickness", "9.9999", b"1_0.0 "),
    ("SliceThickness", "9.9999", b"nan   "), ("SliceThickness", "9.9999", b"abc   "),
    ("SliceThickness", "9.9999", b"      "), ("SliceThickness", "9.9999", b"1\\2   "),
    ("KVP", "99.999", b"120\\14"), ("KVP", "99.999", b"1e400 "), ("KVP", "99.999", b"-0.0  "),
    ("RescaleIntercept", "-9999.9", b"-1024. "), ("RescaleSlope", "9.99", b"1E0 "),
    ("SeriesDescription", "XXXXXXXX", b"AB\0CD   "), ("SeriesDescription", "XXXXXXXX", b"  lead  "),
    ("SeriesDescription", "XXXXXXXX", b"A\\B \\C  "), ("SeriesDescription", "XXXXXXXX", b"T\xe9te    "),
    ("SeriesDescription", "XXXXXXXX", b"tab\there"), ("SeriesDescription", "XXXXXXXX", b"\\\\\\\\\\\\\\\\"),
    ("Manufacturer", "YYYYYYYY", b"\0\0\0\0\0\0\0\0"), ("ConvolutionKernel", "ZZZZ", b"B30f"),
    ("Modality", "QQ", b"ct"), ("BodyPartExamined", "WWWW", b"HE\\D"),
    ("StudyInstanceUID", "1.2.3.999999", b"1.2.3.99999\0"), ("SeriesInstanceUID", "1.2.3.888888", b"1.2.3.8\\8888"),
    ("PatientID", "PPPPPPPP", b"  PID \0 "), ("PixelSpacing", "9.99", b"0.5 "),
    ("PixelSpacing", ["9.99", "9.99", "9.99"], b"0.5\\0.5\\0.5   "),
]


def _crafted(src: Path, i: int, keyword: str, placeholder: str | list[str], raw: bytes,
             charset: str | None = None) -> None:
    spec = SeriesSpec(n_slices=3, rows=8, cols=8)
    paths = write_series(src / f"crafted{i:02d}", spec)
    for path in paths[:1]:
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, placeholder)
        if charset is not None:
            ds.SpecificCharacterSet = charset
        ds.save_as(path)
        _patch(path, "\\".join(placeholder if isinstance(placeholder, list) else [placeholder]).encode(), raw)


def _corpus(src: Path) -> None:
    hostile_corpus.write_corpus(src / "hostile")
    variants = {"signed": {"unsigned": False, "slope": 2.0, "intercept": -1000.0},
                "padding": {"unsigned": False, "fov_radius_mm": 30.0, "padding_value": -2000},
                "rle": {"transfer_syntax": "rle"}, "deflate": {"transfer_syntax": "deflate"},
                "j2k": {"transfer_syntax": "j2k", "rows": 64, "cols": 64},
                "flipped": {"orientation": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)}}
    for name, variant in variants.items():
        write_series(src / "factory" / name, SeriesSpec(**{"n_slices": 4, "rows": 16, "cols": 12, **variant}))
    write_enhanced(src / "factory" / "enhanced" / "e.dcm", SeriesSpec(n_slices=5, rows=16, cols=12))
    for i, (keyword, placeholder, raw) in enumerate(CRAFTED):
        _crafted(src / "crafted", i, keyword, placeholder, raw)
    _crafted(src / "crafted", 90, "SeriesDescription", "XXXXXXXX", b"T\xe9te    ", "ISO_IR 100")
    _crafted(src / "crafted", 91, "SeriesDescription", "XXXXXXXX", b"ascii   ", "ISO 2022 IR 87")
    _crafted(src / "crafted", 92, "SeriesDescription", "XXXXXXXX", b"ascii   ", "ISO_IR 192")
    _crafted(src / "crafted", 93, "SeriesDescription", "XXXXXXXX", b"ascii   ", "\\ISO 2022 IR 87")
    implicit = write_series(src / "implicit", SeriesSpec(n_slices=3, rows=8, cols=8))
    for path in implicit:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(path, implicit_vr=True, little_endian=True)
    from headct.data.synth.dataset import generate

    cfg = SynthConfig(out=src / "synth", n_patients=2, seed=5, matrix=32, pixel_mm=5.0, slice_thickness_mm=10.0,
                      extra_series_fraction=1.0, workers=1)
    generate(cfg, cfg.out, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("fastpaths")
    _corpus(src)
    return src


def _read(path: Path, src: Path):
    """What discovery makes of one file: its FileRead (or the exception) from each registered format."""
    try:
        return read_headers([path], src)
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return (type(exc).__name__, str(exc))


def test_header_values_read_from_raw_elements_equal_pydicoms_conversion(corpus: Path, monkeypatch) -> None:
    files = list_files(corpus).files
    raw, used = dicom_values._raw, []
    monkeypatch.setattr(dicom_values, "_raw", lambda *a: used.append(raw(*a)) or used[-1])
    fast = [_read(path, corpus) for path in files]
    assert sum(value is not None for value in used) > 10 * len(files)  # the raw bytes were read, mostly
    monkeypatch.setattr(dicom_values, "_raw", lambda *a: None)  # every value through pydicom, as before
    slow = [_read(path, corpus) for path in files]
    assert len(files) > 150
    for path, a, b in zip(files, fast, slow, strict=True):
        assert a == b or repr(a) == repr(b), path.relative_to(corpus)  # repr: NaN values compare unequal
    read = sum(len(found.headers) for found in fast)
    assert read > 150 and sum(len(found.bad_files) for found in fast) >= 1


def _reference_is_synthetic(ds: pydicom.Dataset) -> bool:
    try:
        item = ds.get_private_item(marker.GROUP, marker.ELEMENT, marker.CREATOR)
    except (KeyError, ValueError):
        return False
    value = item.value.decode("latin-1") if isinstance(item.value, bytes) else str(item.value)
    return value.strip() == marker.VALUE


def test_the_synthetic_marker_is_found_as_get_private_item_finds_it(corpus: Path, tmp_path: Path) -> None:
    files = [p for p in list_files(corpus).files if dicom.has_dicom_preamble(formats.Probe(p))]
    # a second private block before the marker's, and the marker's creator in a later block
    moved = tmp_path / "moved.dcm"
    ds = pydicom.dcmread(next(p for p in files if "synth" in str(p)))
    value = ds.get_private_item(marker.GROUP, marker.ELEMENT, marker.CREATOR).value
    for tag in [t for t in ds._dict if t >> 16 == marker.GROUP]:
        del ds[tag]
    ds.private_block(marker.GROUP, "OTHER VENDOR", create=True).add_new(marker.ELEMENT, "LO", "something")
    ds.private_block(marker.GROUP, marker.CREATOR, create=True).add_new(marker.ELEMENT, "LO", value)
    ds.save_as(moved)
    results = {p: (dicom.is_synthetic(pydicom.dcmread(p, stop_before_pixels=True)),
                   _reference_is_synthetic(pydicom.dcmread(p, stop_before_pixels=True)))
               for p in [*files, moved]}
    assert all(a == b for a, b in results.values())
    assert results[moved] == (True, True) and sum(a for a, _ in results.values()) > 20


def _reference_header_facts(path: Path):
    """What discovery's header helpers computed with pydicom's conversions before the raw reads (issue 16)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.pixels import as_pixel_options

    with open(path, "rb") as fp:
        read_preamble(fp, False)
        deflated = str(_read_file_meta_info(fp).get("TransferSyntaxUID", "")) == dicom._DEFLATED
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    try:
        bits = int(ds.BitsAllocated) * int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames") or 1) * int(
            ds.get("SamplesPerPixel") or 1)
        needed = (bits + 7) // 8
    except (AttributeError, TypeError, ValueError):
        needed = None
    index = (str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10"
             or "DirectoryRecordSequence" in ds)
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        options = list(as_pixel_options(ds, transfer_syntax_uid=syntax).items())
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        options = type(exc).__name__
    return deflated, needed, index, options


def _header_facts(path: Path):
    with open(path, "rb") as fp:
        plain = dicom.plainly_not_deflated(fp)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = pydicom.uid.UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        options = list(dicom_pixels.pixel_options(ds, syntax).items())
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        options = type(exc).__name__
    return plain, dicom.pixel_bytes_needed(ds), dicom.is_media_index(ds), options


def test_header_facts_read_from_raw_bytes_equal_pydicoms(corpus: Path) -> None:
    """The file meta's transfer syntax (the deflate guard), the pixel bytes a header needs, the DICOMDIR test and
    the decoding options, each read from raw bytes where plain, against pydicom's conversions."""
    files = [p for p in list_files(corpus).files if dicom.has_dicom_preamble(formats.Probe(p))]
    compared = plain = 0
    for path in files:
        try:
            expected = _reference_header_facts(path)
        except Exception:  # noqa: BLE001 - a file pydicom cannot read: discovery reports it, nothing to compare
            continue
        found = _header_facts(path)
        assert not (found[0] and expected[0]), path  # never "plainly not deflated" for a deflated file
        assert found[1:] == expected[1:], path.relative_to(corpus)
        types = [type(v) for _, v in found[3]] if isinstance(found[3], list) else None
        assert types == ([type(v) for _, v in expected[3]] if isinstance(expected[3], list) else None)
        compared, plain = compared + 1, plain + found[0]
    assert compared > 150 and plain > 100 and sum(_reference_header_facts(p)[0] for p in files
                                                   if "deflate" in str(p)) >= 1


# ------------------------------------------------------------------------------------------------ pixels
LENIENT = QcRules(min_slices=2, min_coverage_mm=1.0)
def _load(series, geometry):
    try:
        return formats.of(series).load_hu(series, geometry, -1024.0)
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return (type(exc).__name__, str(exc))


def _same(a, b) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return a == b


def test_pixels_read_at_the_recorded_offset_equal_iter_pixels(corpus: Path) -> None:
    series_list = [s for s in group_series(read_headers(list_files(corpus).files, corpus).headers)
                   if s.format in ("dicom", "enhanced_ct")]
    compared = direct = 0
    for series in series_list:
        geometry = formats.of(series).header_qc(series, LENIENT, None)
        if not isinstance(geometry, StackGeometry):  # refused before any pixel is read (e.g. 65535 x 65535)
            continue
        plain = dataclasses.replace(series, slices=tuple(dataclasses.replace(h, extra=None) for h in series.slices))
        a, b = _load(series, geometry), _load(plain, geometry)
        assert _same(a, b), series.first.path.parent.relative_to(corpus)
        compared += 1
        direct += isinstance(series.first.extra, dicom.PixelElement)
    assert compared > 20 and direct > 15


def test_a_file_changed_after_discovery_is_read_as_it_is_now(tmp_path: Path) -> None:
    """The recorded element header no longer matches (a longer value before the pixels): iter_pixels reads it."""
    paths = write_series(tmp_path / "s", SeriesSpec(n_slices=4, rows=16, cols=12))
    series = group_series(read_headers(paths, tmp_path).headers)[0]
    geometry = stack_geometry(series)
    before = formats.of(series).load_hu(series, geometry, -1024.0)
    ds = pydicom.dcmread(paths[2])
    ds.SeriesDescription = "A LONGER DESCRIPTION THAN BEFORE"
    ds.PixelData = (np.frombuffer(ds.PixelData, np.uint16) + 7).astype(np.uint16).tobytes()
    ds.save_as(paths[2])
    after = formats.of(series).load_hu(series, geometry, -1024.0)
    k = geometry.order.index(series.slices.index(next(h for h in series.slices if h.path == paths[2])))
    assert np.array_equal(after[k], before[k] + 7) and np.array_equal(np.delete(after, k, 0), np.delete(before, k, 0))


def _native_series(tmp_path: Path, signed: bool, bits_stored: int, seed: int = 0):
    """A 3-slice series of 16-bit frames whose stored words are random, unused high bits included."""
    paths = write_series(tmp_path / "s", SeriesSpec(n_slices=3, rows=16, cols=12, unsigned=not signed))
    rng = np.random.default_rng(seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
        ds.PixelData = rng.integers(0, 2**16, 16 * 12, dtype=np.uint16).tobytes()
        ds.save_as(path)
    series = group_series(read_headers(paths, tmp_path).headers)[0]
    plain = dataclasses.replace(series, slices=tuple(dataclasses.replace(h, extra=None) for h in series.slices))
    return paths, series, plain, stack_geometry(series)


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits_stored", [16, 12, 1])
def test_native_frames_read_into_a_buffer_equal_pydicoms_decoder(tmp_path: Path, monkeypatch, signed: bool,
                                                                 bits_stored: int) -> None:
    _, series, plain, geometry = _native_series(tmp_path, signed, bits_stored, bits_stored)
    assert all(dicom_pixels.native_layout(dict(h.extra.options)) == (np.dtype("<i2" if signed else "<u2"),
                                                                       16 - bits_stored) for h in series.slices)
    read, calls = dicom_pixels._read_native, []
    monkeypatch.setattr(dicom_pixels, "_read_native", lambda *a: calls.append(1) or read(*a))
    fast, slow = _load(series, geometry), _load(plain, geometry)
    assert len(calls) == 3 and isinstance(fast, np.ndarray) and _same(fast, slow)
    assert len(np.unique(fast)) > 1 or bits_stored == 1


@pytest.mark.parametrize("cut", [1, 2, 101])
def test_a_truncated_native_frame_is_the_error_pydicoms_decoder_gives(tmp_path: Path, cut: int) -> None:
    paths, series, plain, geometry = _native_series(tmp_path, False, 12)
    paths[1].write_bytes(paths[1].read_bytes()[:-cut])
    fast, slow = _load(series, geometry), _load(plain, geometry)
    assert isinstance(fast, tuple) and fast == slow and "pixel data could not be decoded (ValueError" in fast[1]


def test_only_plain_native_frames_take_the_buffer_read() -> None:
    base = {"transfer_syntax_uid": pydicom.uid.ExplicitVRLittleEndian, "pixel_keyword": "PixelData",
            "photometric_interpretation": "MONOCHROME2", "samples_per_pixel": 1, "number_of_frames": 1,
            "bits_allocated": 16, "pixel_representation": 1, "bits_stored": 12, "rows": 512, "columns": 512}
    assert dicom_pixels.native_layout(base) == (np.dtype("<i2"), 4)
    for key, value in [("transfer_syntax_uid", pydicom.uid.RLELossless), ("transfer_syntax_uid", "1.2.840.10008.1.2.2"),
                       ("pixel_keyword", "FloatPixelData"), ("photometric_interpretation", "RGB"),
                       ("samples_per_pixel", 3), ("number_of_frames", 2), ("bits_allocated", 8),
                       ("bits_allocated", 32), ("pixel_representation", 2), ("bits_stored", 17), ("bits_stored", 0),
                       ("rows", 0), ("columns", 65536), ("rows", "512"), ("bits_stored", None)]:
        assert dicom_pixels.native_layout({**base, key: value}) is None, (key, value)


# ------------------------------------------------------------------------------------------------ resampling
AXES = {"axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), "flipped": (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        "swapped": (0.0, 1.0, 0.0, 1.0, 0.0, 0.0), "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        "sagittal_flipped": (0.0, -1.0, 0.0, 0.0, 0.0, 1.0)}


@pytest.mark.parametrize("orientation", list(AXES))
@pytest.mark.parametrize("fit", ["isotropic", "stretch"])
def test_separable_resampling_equals_the_general_resampler(orientation: str, fit: str) -> None:
    rng = np.random.default_rng(len(orientation))
    spec = SeriesSpec(n_slices=23, rows=37, cols=29, pixel_spacing=(3.1, 2.7), slice_step=4.3,
                      orientation=AXES[orientation], centre=(3.0, -7.0, 11.0))
    positions = slice_positions(spec)
    positions[:, :] += rng.normal(0.0, 0.4, (len(positions), 1)) * np.array([0.3, 1.0, 0.0])  # table shift, tilt
    steps = np.diff(positions @ np.cross(AXES[orientation][:3], AXES[orientation][3:]))
    assert steps.min() > 0
    from headct.data.series import Series, SliceHeader

    headers = tuple(SliceHeader(path=Path(f"/x/{k}"), study_uid="1", series_uid="2", patient_id="", modality="CT",
                                image_type=(), sop_class_uid="", rows=spec.rows, cols=spec.cols,
                                pixel_spacing=spec.pixel_spacing, orientation=spec.orientation,
                                position=tuple(p), frames=1, slice_thickness=None, kernel="", kvp=None,
                                manufacturer="", body_part="", series_description="", contrast_agent="")
                    for k, p in enumerate(positions))
    geometry = stack_geometry(Series("1", "2", headers))
    hu = rng.normal(0.0, 600.0, (spec.n_slices, spec.rows, spec.cols)).astype(np.float32)
    padded = sampled = False
    for shape, spacing in (((24, 20, 28), 5.0), ((8, 9, 11), 10.0), ((40, 40, 40), 2.0)):
        pre = PreprocessSpec(shape=shape, spacing_mm=spacing, fit=fit)
        lo, hi = resample.head_box_ras(hu, geometry, "none")
        affine = resample.canonical_affine(pre, lo + rng.normal(0, 3, 3), hi)
        fast = resample.resample(hu, geometry, affine, shape, -1024.0)
        general = resample._resample_general(hu, geometry, affine, shape, -1024.0, chunk_voxels=997)
        assert fast.dtype == general.dtype == np.float32
        assert np.array_equal(fast, general)  # equal numbers (a zero's sign aside, which == ignores)
        padded, sampled = padded or (general == -1024.0).any(), sampled or (general != -1024.0).any()
    assert padded and sampled  # the grids reach beyond the stack, and into it


def test_the_in_plane_opening_equals_scipys_binary_opening() -> None:
    rng = np.random.default_rng(0)
    for shape in [(5, 1, 7), (3, 2, 2), (4, 3, 3), (6, 40, 33), (2, 9, 1), (1, 64, 64)]:
        for p in (0.3, 0.7, 0.95):
            mask = rng.random(shape) < p
            expected = ndimage.binary_opening(mask, structure=np.ones((1, 3, 3), bool))
            assert np.array_equal(resample._open_in_plane(mask), expected), (shape, p)


@pytest.mark.parametrize("orientation", list(AXES))
def test_the_content_hash_copies_each_slice_exactly(orientation: str) -> None:
    rng = np.random.default_rng(1)
    hu = rng.normal(0.0, 500.0, (6, 70, 45)).astype(np.float32)
    row, col = np.asarray(AXES[orientation][:3]), np.asarray(AXES[orientation][3:])
    geometry = StackGeometry(row_dir=row, col_dir=col, normal=np.cross(row, col), pixel_spacing=(1.0, 1.0),
                                      positions=np.zeros((6, 3)), along=np.arange(6.0), order=tuple(range(6)),
                                      rows=70, cols=45)
    from nibabel.orientations import apply_orientation, io_orientation

    axes = np.stack([row, col, geometry.normal], axis=1) * LPS_TO_RAS.diagonal()[:3, None]
    view = apply_orientation(hu.transpose(2, 1, 0), io_orientation(np.vstack([np.c_[axes, np.zeros(3)],
                                                                               [0, 0, 0, 1]])))
    digest = hashlib.sha256(str(view.shape).encode())
    for k in range(view.shape[2]):
        digest.update(np.ascontiguousarray(view[:, :, k]).tobytes())
    assert dedup.content_sha256(hu, geometry) == digest.hexdigest()
