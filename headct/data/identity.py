"""Pseudonymous identifiers: HMAC-SHA256 keyed hashes of the source keys (DESIGN.md, "Identity and privacy").

    patient  `pat_<16 hex>`  of the patient key (DICOM PatientID, or the dataset's own key such as CQ500 `name`)
    study    `stu_<16 hex>`  of StudyInstanceUID
    series   `ser_<16 hex>`  of SeriesInstanceUID (the scan_id of the canonical store)
    instances `ins_<16 hex>` of the sorted set of a series' SOPInstanceUIDs (duplicate detection only)

A keyed hash (not a plain hash) because PatientIDs and UIDs are guessable: without the key nobody can
recompute a pseudonym from a known PatientID. The key comes from the environment variable
HEADCT_PSEUDONYM_KEY, or from the file named by HEADCT_PSEUDONYM_KEY_FILE; never from params.yaml, and it is
never printed or logged.

The fixed, public `DEMO_KEY` is used only for data `headct synth` wrote, recognised from the data itself (never by
a setting): the generator marks every file it writes (headct/data/synth/marker.py). A source holding any other file needs a real key (`demo_key_refusal`). The marker tells the
generator's output from an export; it is not a security boundary (anyone can write it into a file on purpose).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from headct.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

KEY_ENV = "HEADCT_PSEUDONYM_KEY"
KEY_FILE_ENV = "HEADCT_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16
# DEMO ONLY: a public constant, so pseudonyms made with it protect nothing. Synthetic data only.
DEMO_KEY = b"headct-DEMO-ONLY-pseudonym-key--public--never-use-for-real-data"

_HOW_TO = (
    f"set {KEY_ENV} to a secret of at least {MIN_KEY_BYTES} characters "
    f"(e.g. `export {KEY_ENV}=$(python -c 'import secrets; print(secrets.token_hex(32))')`), "
    f"or {KEY_FILE_ENV} to a file holding it; keep the same key for every ingest of one project "
    "(pseudonyms change with the key). Data written by `headct synth` needs no key (the public demo key is used "
    "for it, recognised from the files)"
)


def configured_key() -> bytes | None:
    """The key from HEADCT_PSEUDONYM_KEY, else from the file HEADCT_PSEUDONYM_KEY_FILE names, else None.

    Raises InputError when both are set, the file is missing or the key is too short (never echoing it).
    """
    value = os.environ.get(KEY_ENV)
    key_file = os.environ.get(KEY_FILE_ENV)
    if value and key_file:
        raise InputError(f"both {KEY_ENV} and {KEY_FILE_ENV} are set; set only one of them")
    if value:
        key, origin = value.encode(), KEY_ENV
    elif key_file:
        path = Path(key_file).expanduser()
        if not path.is_file():
            raise InputError(f"{KEY_FILE_ENV} names {path}, which is not a readable file")
        key, origin = path.read_bytes().strip(), f"the file {path}"
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise InputError(f"the pseudonym key from {origin} is shorter than {MIN_KEY_BYTES} bytes: {_HOW_TO}")
    return key


def demo_key_refusal(not_synthetic: int | None, example: str, configured: bool) -> str:
    """The message refusing the demo key for a source of which `not_synthetic` files (None: the first file
    read), e.g. `example` (a path under SRC: terminal only), were not written by `headct synth`; `configured`:
    the key set is the demo key."""
    how = ("the key set is the public demo key, which is accepted only for data `headct synth` wrote"
           if configured else "no pseudonym key is set")
    which = (f"the first file read under SRC ({example}) is" if not_synthetic is None
             else f"{not_synthetic} file(s) under SRC (e.g. {example}) are")
    return f"{how}, and {which} not synthetic: pseudonyms under a public key protect nothing; {_HOW_TO}"


def choose_key(configured: bytes | None, synthetic: bool, warn: Callable[[str], None] | None = print) -> bytes | None:
    """The key for a source: the configured one; else, for a wholly synthetic source (`synthetic`), the demo key
    (one line through `warn`); else None (the caller refuses with `demo_key_refusal`). A configured key equal to
    the demo key counts as no key for real data."""
    if configured is not None and configured != DEMO_KEY:
        return configured
    if not synthetic:
        return None
    if warn is not None and configured is None:
        warn("using the public demo pseudonym key: every file under SRC was written by `headct synth`")
    return DEMO_KEY


class Pseudonymizer:
    """Makes `pat_`/`stu_`/`ser_` pseudonyms with one key. The key is kept private (not in repr)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise InputError(f"pseudonym key shorter than {MIN_KEY_BYTES} bytes")
        self._key = key

    def __repr__(self) -> str:
        return "Pseudonymizer(key=<hidden>)"

    def _digest(self, kind: str, value: str) -> str:
        # The kind is part of the message so a patient key equal to some UID never yields related ids.
        # surrogateescape: a key made from a file name that is not UTF-8 (a NIfTI's path under SRC, read by
        # Python as lone surrogates) hashes its raw bytes; any valid UTF-8 text encodes exactly as before
        mac = hmac.new(self._key, f"{kind}\x00{value.strip()}".encode("utf-8", "surrogateescape"), hashlib.sha256)
        return f"{kind}_{mac.hexdigest()[:16]}"

    def patient(self, patient_key: str) -> str:
        return self._digest("pat", patient_key)

    def study(self, study_uid: str) -> str:
        return self._digest("stu", study_uid)

    def series(self, series_uid: str) -> str:
        return self._digest("ser", series_uid)

    def source(self, src_path: str) -> str:
        """A store's source folder (headct.data.guards.check_source), never written in clear."""
        return self._digest("src", src_path)

    def instances(self, sop_instance_uids: list[str] | tuple[str, ...] | set[str]) -> str:
        """One id for a set of SOP instances: equal for the same instances exported twice under other names."""
        return self._digest("ins", "\n".join(sorted(set(sop_instance_uids))))


# The linkage file (pseudonym <-> source keys and folders; local only, never shared) holds source folder names as
# they are on disk: a name that is not valid UTF-8 (Python's lone surrogates) is written and read back as its raw
# bytes (surrogateescape), in object columns (pandas' string dtype refuses surrogates), so such a name neither
# stops the run nor is altered.
LINKAGE_ERRORS = "surrogateescape"


def write_linkage(path: Path, rows: pd.DataFrame | list[dict]) -> None:
    import pandas as pd

    from headct.io import atomic_path

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, dtype=object)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, errors=LINKAGE_ERRORS)


def read_linkage(path: Path) -> pd.DataFrame:
    import pandas as pd

    try:
        return pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors=LINKAGE_ERRORS)
    except pd.errors.EmptyDataError:  # a run (a shard) that linked no series wrote an empty file
        return pd.DataFrame(dtype=object)
