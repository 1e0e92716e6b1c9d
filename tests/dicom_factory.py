"""Write small, real DICOM CT series with chosen geometry, for the ingestion tests (no pytest here).

A series is described by a `SeriesSpec` (orientation, spacing, slice step, storage) and filled from a world
phantom: a function of LPS millimetre coordinates returning HU, so the same anatomy can be written with any
geometry and the ingested volumes compared. DICOM conventions used:
    voxel (col, row) of slice k sits at  IPP_k + col * PixelSpacing[1] * IOP[:3] + row * PixelSpacing[0] * IOP[3:]
and the slice normal is IOP[:3] x IOP[3:].
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

# SeriesSpec.transfer_syntax -> how the pixel data is stored (pydicom encodes RLE natively, JPEG 2000 through
# pylibjpeg-openjpeg; deflate compresses the whole dataset)
SYNTAXES = {"rle": RLELossless, "j2k": JPEG2000Lossless, "deflate": DeflatedExplicitVRLittleEndian}

# LPS mm centre of the marker block planted on the patient's Left, Anterior, Superior side.
MARKER_LPS = (40.0, -45.0, 35.0)
MARKER_HU = 2000.0
AIR_HU = -1000.0  # inside the scanner's field of view; padding outside it is -1024, so the two differ


@dataclasses.dataclass
class SeriesSpec:
    n_slices: int = 32
    rows: int = 72
    cols: int = 64
    pixel_spacing: tuple[float, float] = (3.0, 3.0)  # (between rows, between columns) mm, DICOM order
    slice_step: float = 5.0  # mm between successive positions along the slice normal
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # ImageOrientationPatient
    centre: tuple[float, float, float] = (0.0, 0.0, 0.0)  # LPS mm of the stack's centre
    positions: list[tuple[float, float, float]] | None = None  # explicit IPPs (overrides the regular stack)
    slope: float = 1.0
    intercept: float = -1024.0
    unsigned: bool = True  # PixelRepresentation 0 (stored = (HU - intercept) / slope >= 0)
    modality: str = "CT"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    kernel: str = "H30s"
    slice_thickness: float | None = None  # default: slice_step
    series_description: str = "CT PLAIN"
    reverse_instances: bool = False  # InstanceNumber and file order run against the position order
    shuffle_names: bool = False  # random file names (seeded), unrelated to position
    extension: str = ".dcm"
    name_seed: int = 0
    transfer_syntax: str | None = None  # None: explicit VR little endian; else a key of SYNTAXES
    # pixels farther than this from the slice centre (mm, in-plane) lie outside the reconstruction circle:
    # stored as `padding_value` and declared as PixelPaddingValue
    fov_radius_mm: float | None = None
    padding_value: int = -2000
    contrast_agent: str = ""
    study_description: str = "CT HEAD WITHOUT CONTRAST"
    kvp: float = 120.0
    sop_class: str = CTImageStorage
    sop_uids: list[str] | None = None  # reuse these SOPInstanceUIDs (in position order), e.g. a re-export


def head_phantom(lps: np.ndarray, table: bool = True, marker: bool = True) -> np.ndarray:
    """HU at LPS mm points (..., 3): air, a 6 mm skull ellipsoid, brain at 35 HU, a 2000 HU marker block
    (12 mm cube at MARKER_LPS) and optionally a table posterior to the head (LPS +y), joined to it by a strut."""
    x, y, z = lps[..., 0], lps[..., 1], lps[..., 2]
    hu = np.full(x.shape, AIR_HU, np.float32)
    outer = (x / 70.0) ** 2 + (y / 85.0) ** 2 + (z / 75.0) ** 2
    inner = (x / 64.0) ** 2 + (y / 79.0) ** 2 + (z / 69.0) ** 2
    hu[outer <= 1.0] = 1000.0
    hu[inner <= 1.0] = 35.0
    if marker:
        mx, my, mz = MARKER_LPS
        block = (abs(x - mx) <= 6) & (abs(y - my) <= 6) & (abs(z - mz) <= 6)
        hu[block] = MARKER_HU
    if table:  # a 6 mm table, joined to the back of the head by a 3 mm wide strut (a head holder)
        hu[(y >= 95) & (y <= 101) & (abs(x) <= 90)] = 100.0
        hu[(y >= 70) & (y <= 95) & (abs(x) <= 1.5) & (abs(z) <= 20)] = 100.0
    return hu


def slice_positions(spec: SeriesSpec) -> np.ndarray:
    """(N, 3) LPS ImagePositionPatient of each slice, in position order (ascending along the normal)."""
    if spec.positions is not None:
        return np.asarray(spec.positions, float)
    row_dir, col_dir = np.asarray(spec.orientation[:3]), np.asarray(spec.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    rs, cs = spec.pixel_spacing
    half = (spec.cols - 1) / 2 * cs * row_dir + (spec.rows - 1) / 2 * rs * col_dir
    first = np.asarray(spec.centre) - half - (spec.n_slices - 1) / 2 * spec.slice_step * normal
    return first + np.arange(spec.n_slices)[:, None] * spec.slice_step * normal


def voxel_lps(spec: SeriesSpec, position: np.ndarray) -> np.ndarray:
    """(rows, cols, 3) LPS mm of every pixel of the slice at `position`."""
    row_dir, col_dir = np.asarray(spec.orientation[:3]), np.asarray(spec.orientation[3:])
    rs, cs = spec.pixel_spacing
    r, c = np.meshgrid(np.arange(spec.rows), np.arange(spec.cols), indexing="ij")
    return position + c[..., None] * cs * row_dir + r[..., None] * rs * col_dir


def stored_slices(spec: SeriesSpec, phantom: Callable[[np.ndarray], np.ndarray] = head_phantom) -> np.ndarray:
    """(N, rows, cols) stored values in position order: (HU - intercept) / slope, padding outside the FOV."""
    dtype = np.uint16 if spec.unsigned else np.int16
    info = np.iinfo(dtype)
    slices = []
    for position in slice_positions(spec):
        lps = voxel_lps(spec, position)
        stored = np.rint((phantom(lps) - spec.intercept) / spec.slope)
        if spec.fov_radius_mm is not None:
            centre = lps[(spec.rows - 1) // 2, (spec.cols - 1) // 2]
            outside = np.linalg.norm(lps - centre, axis=-1) > spec.fov_radius_mm
            stored[outside] = spec.padding_value
        if stored.min() < info.min or stored.max() > info.max:
            raise ValueError(f"values do not fit {dtype.__name__} with slope/intercept {spec.slope}/{spec.intercept}")
        slices.append(stored.astype(dtype))
    return np.stack(slices)


def write_series(
    folder: Path,
    spec: SeriesSpec,
    phantom: Callable[[np.ndarray], np.ndarray] = head_phantom,
    *,
    patient_id: str = "PID-TEST-0001",
    patient_name: str = "Test^Patient",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write one series into `folder` (one file per slice); returns the paths in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    positions = slice_positions(spec)
    n = len(positions)
    instance = list(range(n, 0, -1)) if spec.reverse_instances else list(range(1, n + 1))
    names = [f"CT{i:06d}{spec.extension}" for i in instance]
    if spec.shuffle_names:
        random.Random(spec.name_seed).shuffle(names)
    stored = stored_slices(spec, phantom)
    paths = []
    for k, position in enumerate(positions):
        ds = _slice_dataset(spec, position, instance[k], study_uid, series_uid, patient_id, patient_name)
        if spec.sop_uids is not None:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = spec.sop_uids[k]
        ds.PixelData = stored[k].tobytes()
        _encode(ds, spec)
        path = folder / names[k]
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _encode(ds: Dataset, spec: SeriesSpec) -> None:
    if spec.transfer_syntax is None:
        return
    syntax = SYNTAXES[spec.transfer_syntax]
    if spec.transfer_syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax)


def write_enhanced(
    path: Path,
    spec: SeriesSpec,
    phantom: Callable[[np.ndarray], np.ndarray] = head_phantom,
    *,
    frame_order_seed: int | None = 0,
    patient_id: str = "PID-TEST-0001",
    study_uid: str | None = None,
) -> Path:
    """One Enhanced CT object holding the whole series as frames (in a shuffled frame order unless
    `frame_order_seed` is None), geometry and rescale in the functional groups, nothing at the top level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    positions = slice_positions(spec)
    stored = stored_slices(spec, phantom)
    order = list(range(len(positions)))
    if frame_order_seed is not None:
        random.Random(frame_order_seed).shuffle(order)
    ds = _slice_dataset(spec, positions[0], 1, study_uid or generate_uid(), generate_uid(), patient_id,
                        "Test^Patient")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "ConvolutionKernel", "KVP", "InstanceNumber"):
        delattr(ds, keyword)
    ds.NumberOfFrames = len(order)
    shared = Dataset()
    orientation, measures, transform, recon, xray = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [float(v) for v in spec.orientation]
    measures.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    measures.SliceThickness = spec.slice_thickness or spec.slice_step
    transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = spec.slope, spec.intercept, "HU"
    recon.ConvolutionKernel = spec.kernel
    xray.KVP = spec.kvp
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    shared.CTReconstructionSequence = Sequence([recon])
    shared.CTXRayDetailsSequence = Sequence([xray])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        item, plane, kind = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [float(v) for v in positions[k]]
        kind.FrameType = list(spec.image_type)
        item.PlanePositionSequence = Sequence([plane])
        item.CTImageFrameTypeSequence = Sequence([kind])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(stored[order]).tobytes()
    _encode(ds, spec)
    ds.save_as(path, enforce_file_format=True)
    return path


def nifti_of(spec: SeriesSpec, phantom: Callable[[np.ndarray], np.ndarray] = head_phantom):
    """The same volume as `write_series(spec)` as a nibabel NIfTI image: the stored values with scl_slope/scl_inter
    = RescaleSlope/RescaleIntercept, array axes (columns, rows, slices), affine voxel -> RAS mm."""
    import nibabel as nib

    positions = slice_positions(spec)
    row_dir, col_dir = np.asarray(spec.orientation[:3]), np.asarray(spec.orientation[3:])
    rs, cs = spec.pixel_spacing
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_dir * cs, col_dir * rs
    lps[:3, 2] = (positions[-1] - positions[0]) / max(len(positions) - 1, 1)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    image = nib.Nifti1Image(stored_slices(spec, phantom).transpose(2, 1, 0), affine)
    image.header.set_slope_inter(spec.slope, spec.intercept)
    return image


def _slice_dataset(
    spec: SeriesSpec, position: np.ndarray, instance: int, study_uid: str, series_uid: str,
    patient_id: str, patient_name: str,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = spec.sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = spec.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC" + patient_id[-8:]
    ds.InstitutionName = "Test Hospital"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = spec.modality
    ds.ImageType = list(spec.image_type)
    ds.Manufacturer = "TESTVENDOR"
    ds.BodyPartExamined = "HEAD"
    ds.SeriesDescription = spec.series_description
    ds.StudyDescription = spec.study_description
    ds.ConvolutionKernel = spec.kernel
    ds.KVP = spec.kvp
    if spec.contrast_agent:
        ds.ContrastBolusAgent = spec.contrast_agent
    ds.SliceThickness = spec.slice_thickness or spec.slice_step
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in spec.orientation]
    ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
    ds.Rows, ds.Columns = spec.rows, spec.cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0 if spec.unsigned else 1
    ds.RescaleSlope = spec.slope
    ds.RescaleIntercept = spec.intercept
    if spec.fov_radius_mm is not None:
        ds.PixelPaddingValue = spec.padding_value
    return ds

