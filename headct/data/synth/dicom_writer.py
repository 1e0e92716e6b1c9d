"""Write reconstructed series as real DICOM files (CT Image Storage, explicit VR little endian) with pydicom.

Layout (CQ500): `<study folder>/Unknown Study/<SeriesDescription>/CT000000.dcm ...` (some series without the
extension). Geometry is DICOM LPS: ImagePositionPatient is pixel (0, 0) of each slice, rows run along the
second ImageOrientationPatient vector. HU = stored * RescaleSlope + RescaleIntercept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from headct.data.synth import marker
from headct.data.synth.scanner import SliceStack

AXIAL_ORIENTATION = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
LATERAL_ORIENTATION = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]  # scout: columns anterior -> posterior, rows downwards


def make_uid(*parts: object) -> str:
    """A deterministic UID from its parts (seed, study index, series number, ...)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class StudyHeader:
    """Study-level header values; the first five are the fake identifying values (unique per study)."""

    patient_name: str
    patient_id: str
    birth_date: str  # DICOM DA, YYYYMMDD
    accession: str
    institution: str
    sex: str
    age_years: int
    study_date: str
    study_time: str
    study_description: str
    study_uid: str
    frame_uid: str
    manufacturer: str
    model: str
    kvp: float


@dataclass(frozen=True)
class SeriesHeader:
    number: int
    description: str  # also the folder name
    kernel: str
    image_type: tuple[str, ...]
    uid: str
    signed: bool  # PixelRepresentation 1 (int16) or 0 (uint16)
    intercept: float  # RescaleIntercept (-1024 or 0); slope is 1
    padding: int | None  # stored value outside the reconstruction circle (GE style), or None
    extension: bool  # file names with ".dcm"
    descending: bool  # instance 1 is the top slice (so file order is not anatomical order)
    window: tuple[int, int] = (40, 80)  # WindowCenter, WindowWidth suggested for display


def _base_dataset(study: StudyHeader, series: SeriesHeader) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.Modality = "CT"
    ds.ImageType = list(series.image_type)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age_years:03d}Y"
    ds.AccessionNumber = study.accession
    ds.InstitutionName = study.institution
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = study.study_time
    ds.StudyDescription = study.study_description
    ds.SeriesDescription = series.description
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = series.uid
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.StudyID = "1"
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.Manufacturer = study.manufacturer
    ds.ManufacturerModelName = study.model
    ds.BodyPartExamined = "HEAD"
    ds.PatientPosition = "HFS"
    ds.KVP = study.kvp
    ds.ConvolutionKernel = series.kernel
    ds.GantryDetectorTilt = 0.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if series.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if series.signed else 0
    ds.RescaleIntercept = series.intercept
    ds.RescaleSlope = 1.0
    ds.RescaleType = "HU"
    # the marker that lets ingest use the public demo pseudonym key for this data (headct/data/synth/marker.py)
    ds.private_block(marker.GROUP, marker.CREATOR, create=True).add_new(marker.ELEMENT, "LO", marker.VALUE)
    return ds


def _stored(hu: np.ndarray, series: SeriesHeader) -> np.ndarray:
    stored = np.rint(hu - series.intercept)
    if series.signed:
        return stored.astype(np.int16)
    return np.clip(stored, 0, 4095).astype(np.uint16)


def write_axial(folder: Path, stack: SliceStack, study: StudyHeader, series: SeriesHeader, seed: object) -> int:
    """Write one axial series; returns the bytes written. Slices are in stack order (inferior first)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(study, series)
    n, rows, cols = stack.hu.shape
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = [stack.pixel_mm, stack.pixel_mm]
    ds.SliceThickness = stack.thickness_mm
    ds.SpacingBetweenSlices = stack.spacing_mm
    ds.ImageOrientationPatient = AXIAL_ORIENTATION
    ds.ReconstructionDiameter = rows * stack.pixel_mm
    ds.WindowCenter, ds.WindowWidth = series.window
    stored = _stored(stack.hu, series)
    if series.padding is not None:  # outside the reconstruction circle
        yy, xx = np.mgrid[0:rows, 0:cols]
        outside = (yy - rows / 2 + 0.5) ** 2 + (xx - cols / 2 + 0.5) ** 2 > (rows / 2) ** 2
        stored[:, outside] = series.padding
        ds.PixelPaddingValue = series.padding
    order = np.arange(n)[::-1] if series.descending else np.arange(n)
    total = 0
    for instance, k in enumerate(order, start=1):
        sop = make_uid(seed, series.number, "sop", int(k))
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = instance
        position = [round(float(v), 4) for v in stack.positions[k]]
        ds.ImagePositionPatient = position
        ds.SliceLocation = position[2]
        ds.PixelData = stored[k].tobytes()
        path = folder / (f"CT{instance - 1:06d}" + (".dcm" if series.extension else ""))
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def write_localizer(folder: Path, image: np.ndarray, top_left: np.ndarray, pixel_mm: float, study: StudyHeader,
                    series: SeriesHeader, seed: object) -> int:
    """Write a single lateral scout image (ImageType ...\\LOCALIZER; values are not HU)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = _base_dataset(study, series)
    ds.RescaleType = "US"  # unspecified: scout pixel values are attenuation display values
    ds.RescaleIntercept = 0.0
    ds.Rows, ds.Columns = image.shape
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.ImageOrientationPatient = LATERAL_ORIENTATION
    ds.ImagePositionPatient = [round(float(v), 4) for v in top_left]
    ds.SliceThickness = 0.6
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    sop = make_uid(seed, series.number, "sop", 0)
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = 1
    ds.PixelData = image.astype(np.uint16).tobytes()
    path = folder / ("CT000000" + (".dcm" if series.extension else ""))
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def read_identifying(path: Path) -> tuple[list[str], list[str]]:
    """(identifying values, UIDs) from one file's header."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    values = [str(ds.get(k, "") or "").strip() for k in
              ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName")]
    uids = [str(ds.get(k, "") or "") for k in
            ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")]
    return [v for v in values if v], [u for u in uids if u]
