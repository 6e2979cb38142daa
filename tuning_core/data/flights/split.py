"""Splitting the time-ordered canonical table into train, valid and test."""

from __future__ import annotations

import logging

import numpy as np

from tuning_core.config import FlightsData
from tuning_core.errors import DataError

logger = logging.getLogger(__name__)


SPLITS = ("train", "valid", "test")


def split_indices(days: np.ndarray, cfg: FlightsData, src: str) -> tuple[dict[str, np.ndarray | slice], str]:
    """Rows of each split of the time-ordered table (indices, or a slice for the time split), and
    what the time cuts fall on; ``days``: each row's scheduled-departure day."""
    distinct, counts = np.unique(days, return_counts=True)
    return split_rows(distinct, counts, cfg, src)


def split_rows(days: np.ndarray, counts: np.ndarray, cfg: FlightsData,
               src: str) -> tuple[dict[str, np.ndarray | slice], str]:
    """``split_indices`` from the distinct days in order and the rows of each: what a table held in
    parts gives (``ordered.OrderedRows.day_counts``) without an array of every row's day."""
    n = int(counts.sum())
    n_valid = max(1, round(n * cfg.valid_fraction))
    n_test = max(1, round(n * cfg.test_fraction))
    n_train = n - n_valid - n_test
    if n_train < 1:
        raise DataError(f"{src}: only {n} labelled rows; too few to split into train/valid/test")
    if cfg.split == "random":
        perm = np.random.default_rng(cfg.seed).permutation(n)
        parts = np.split(perm, [n_train, n_train + n_valid])
        # Keep each split in time order: reproducible files and readable heads.
        return {s: np.sort(p) for s, p in zip(SPLITS, parts, strict=True)}, "random"

    # Time split: cut on day boundaries when the data spans enough days, so no date is in two
    # splits (same-day weather and congestion would otherwise leak from train into valid/test).
    ends = np.cumsum(counts)

    def snap(b: int, lo: int) -> int | None:
        run = int(np.searchsorted(ends, b, "right"))  # the day of row b: its rows are [left, right)
        left, right = int(ends[run] - counts[run]), int(ends[run])
        for c in sorted((left, right), key=lambda c: abs(c - b)):
            if lo < c < n:
                return c
        return None

    b1 = snap(n_train, 0)
    b2 = snap(n_train + n_valid, b1) if b1 is not None else None
    by = "day"
    if b1 is None or b2 is None or b2 <= b1:
        logger.warning("%s: too few distinct days to cut the time split on day boundaries; "
                       "cutting on scheduled departure instead", src)
        b1, b2, by = n_train, n_train + n_valid, "departure"
    return {"train": slice(0, b1), "valid": slice(b1, b2), "test": slice(b2, n)}, by
