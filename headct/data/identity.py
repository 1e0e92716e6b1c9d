"""Pseudonymous identifiers: HMAC-SHA256 keyed hashes of the source keys (DESIGN.md, "Identity and privacy").

    patient  `pat_<16 hex>`  of the patient key (DICOM PatientID, or the dataset's own key such as CQ500 `name`)
    study    `stu_<16 hex>`  of StudyInstanceUID
    series   `ser_<16 hex>`  of SeriesInstanceUID (the scan_id of the canonical store)
    instances `ins_<16 hex>` of the sorted set of a series' SOPInstanceUIDs (duplicate detection only)

A keyed hash (not a plain hash) because PatientIDs and UIDs are guessable: without the key nobody can
recompute a pseudonym from a known PatientID. The key comes from the environment variable
HEADCT_PSEUDONYM_KEY, or from the file named by HEADCT_PSEUDONYM_KEY_FILE; never from params.yaml, and it is
never printed or logged. The fixed `DEMO_KEY` is for the synthetic demo data only.
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
    "(pseudonyms change with the key). For the synthetic demo only: `--set ingest.demo_key=true`"
)


def load_key(demo_key: bool, warn: Callable[[str], None] | None = print) -> tuple[bytes, bool]:
    """The pseudonym key, and whether it is the demo key.

    Order: HEADCT_PSEUDONYM_KEY, then HEADCT_PSEUDONYM_KEY_FILE, then (only when `demo_key`) DEMO_KEY with a
    one-line warning through `warn`. Raises InputError when none applies or the key is too short.
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
    elif demo_key:
        if warn is not None:
            warn("WARNING: using the public DEMO-ONLY pseudonym key (ingest.demo_key=true); never use it for real data")
        return DEMO_KEY, True
    else:
        raise InputError(f"no pseudonym key: {_HOW_TO}")
    if len(key) < MIN_KEY_BYTES:
        raise InputError(f"the pseudonym key from {origin} is shorter than {MIN_KEY_BYTES} bytes: {_HOW_TO}")
    return key, False


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

    return pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors=LINKAGE_ERRORS)
