"""Synthetic non-contrast head CT: the project's embedded default data set (`headct synth`).

template + skullbase (static MNI152-based anatomy) -> anatomy (random subject) -> phantom (HU volume) ->
findings + lesions (labelled lesions, mass effect) -> scanner (blur, partial volume, noise, streaks) ->
dicom_writer (real CT DICOM series). plan, study and dataset orchestrate a whole data set with a CQ500-style
reads.csv; montage draws the PNG overview.
"""
