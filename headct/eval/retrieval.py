"""Query-by-embedding retrieval: cosine similarity, mean average precision per label.

Every scan of the evaluated split queries all the others, except scans of its own patient (they would be
found by identity, not by finding). For a label, the queries are the scans positive for it; a retrieved scan is
relevant when it is positive too; scans with the label unknown are left out of both sides. mAP is the mean of
the queries' average precision (sum over the relevant hits of precision at that rank, divided by the number of
relevant candidates). A random ranking gives about the positive fraction among the candidates ("chance").
"""

from __future__ import annotations

import numpy as np


def cosine_similarity(embedding: np.ndarray) -> np.ndarray:
    """(n, D) -> (n, n) cosine similarities (a zero vector has similarity 0 to everything)."""
    x = np.asarray(embedding, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)
    return x @ x.T


def query_average_precision(similarity: np.ndarray, y: np.ndarray, patient_id: np.ndarray) -> np.ndarray:
    """AP of each positive query. similarity (n, n); y (n,) 0/1; patient_id (n,). -> (n_pos,) (NaN when a query
    has no relevant candidate)."""
    y = np.asarray(y).astype(bool)
    patient_id = np.asarray(patient_id)
    queries = np.flatnonzero(y)
    sim = similarity[queries].astype(np.float64, copy=True)
    excluded = patient_id[queries][:, None] == patient_id[None, :]
    sim[excluded] = -np.inf
    order = np.argsort(-sim, axis=1, kind="stable")
    relevant = y[order] & ~np.take_along_axis(excluded, order, axis=1)
    hits = np.cumsum(relevant, axis=1)
    rank = np.arange(1, len(y) + 1)[None, :]
    n_relevant = relevant.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (relevant * hits / rank).sum(axis=1) / n_relevant


def retrieval_map(embedding: np.ndarray, y: np.ndarray, patient_id: np.ndarray) -> dict[str, float]:
    """mAP for one label over scans with a known value (y 0/1), with its chance level and counts."""
    ap = query_average_precision(cosine_similarity(embedding), y, patient_id)
    usable = ap[~np.isnan(ap)]
    y = np.asarray(y)
    return {
        "map": float(usable.mean()) if len(usable) else float("nan"),
        "chance": float(y.mean()),
        "n_queries": len(usable),
        "n_candidates": len(y),
    }
