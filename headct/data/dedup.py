"""Duplicate series across the whole store: the same series exported twice must never be stored twice
(it could then land in two splits, leaking test data into training).

Two accepted series are duplicates when they share
    content_sha256   the sha256 of the source HU stack in slice order (same pixels, whatever the UIDs, the
                     transfer syntax, the folder or the format: a DICOM series and its NIfTI conversion agree), or
    instances_id     the keyed hash of the set of SOPInstanceUIDs (the same instances, even re-encoded lossily).
Rule: visit accepted rows by scan_id; the first of each group is kept, every later one is a duplicate of it.
The rule only looks at the rows, so applying it to one whole run or to the union of shards gives the same store.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def find_duplicates(rows: Iterable[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """scan_id -> (kept scan_id, what they share: "pixel content" or "SOP instances") for every duplicate."""
    by_content: dict[str, str] = {}
    by_instances: dict[str, str] = {}
    duplicates: dict[str, tuple[str, str]] = {}
    for row in sorted(rows, key=lambda r: r["scan_id"]):
        content, instances = row.get("content_sha256") or "", row.get("instances_id") or ""
        if content and content in by_content:
            duplicates[row["scan_id"]] = (by_content[content], "pixel content")
            continue
        if instances and instances in by_instances:
            duplicates[row["scan_id"]] = (by_instances[instances], "SOP instances")
            continue
        if content:
            by_content[content] = row["scan_id"]
        if instances:
            by_instances[instances] = row["scan_id"]
    return duplicates


def message(kept: str, what: str) -> str:
    return f"same {what} as {kept}, which is kept"
