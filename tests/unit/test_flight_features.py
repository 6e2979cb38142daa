"""The feature code shared by the data stage and every registered flights model
(tuning_core/data/flight_features.py): both sides read a flight the same way."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.unit.test_flights_data import LOCAL, bts_csv, prepare_local
from tuning_core.data import flight_features, flights


def test_feature_module_imports_nothing_but_numpy_pandas_pyarrow():
    """A copy of the file ships inside each model: it must run where no tunepipe package exists."""
    tree = ast.parse(Path(flight_features.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "collections", "dataclasses", "logging", "typing", "numpy", "pandas",
                        "pyarrow"}, imported


def test_an_impossible_bts_date_is_dropped_by_the_data_stage_and_refused_by_the_model(tmp_path):
    src = bts_csv(tmp_path / "bts.csv")
    good = prepare_local(src, tmp_path)
    # 2019-03-01 becomes 2019-02-29 (2019 is no leap year): a parser would roll it into 1 March.
    text = src.read_text().replace('"2019-03-01"', '"2019-02-29"')
    (tmp_path / "bad").mkdir()
    bad_src = tmp_path / "bad" / "bts.csv"
    bad_src.write_text(text)
    bad = prepare_local(bad_src, tmp_path / "bad")
    assert bad.manifest["dropped"]["missing_schedule"] == 10  # that day's 10 flights, not moved to March
    assert sum(bad.rows.values()) == sum(good.rows.values()) - 9  # 9: one of them was cancelled anyway

    rows = pd.read_csv(src).head(3)
    rows.loc[1, "FlightDate"] = "2019-02-29"
    with pytest.raises(flight_features.FeatureError,
                       match=r"column 'FlightDate' \(bts schema\): '2019-02-29' at row 1 is not a date"):
        flight_features.model_frame(rows, good.manifest["categories"])


def test_model_frame_of_raw_rows_equals_the_data_stages_features_whatever_the_column_case(tmp_path):
    src = bts_csv(tmp_path / "bts.csv")
    version = prepare_local(src, tmp_path)
    raw = pd.read_csv(src)
    canonical, schema = flights.read_canonical(LOCAL, str(src))
    assert schema == "bts"
    expected = flights.to_features(canonical, version.manifest)

    for frame in (raw, raw.rename(columns=str.upper)):
        got = flight_features.model_frame(frame, version.manifest["categories"])
        assert list(got.dtypes.astype(str)) == list(expected.dtypes.astype(str))
        pd.testing.assert_frame_equal(got.reset_index(drop=True), expected.reset_index(drop=True))
    assert np.isfinite(expected["distance"]).all()


@pytest.mark.parametrize("rows", [0, 1, 5000])
def test_categorical_columns_are_recoded_as_their_strings_would_be(rows):
    """Splits read from parquet arrive with categorical columns, recoded through their distinct values
    (not row by row); the result is the one the strings give: the training categories, unseen values
    and missing ones as missing, the same dtype."""
    rng = np.random.default_rng(rows)
    categories = {"carrier": ["AA", "B6", "DL", "UA"], "origin": ["EWR", "JFK"], "dest": []}
    data = {}
    for name in flight_features.FEATURES:
        if flight_features.FEATURE_DTYPES[name] == "category":
            pool = np.array([*categories[name], "ZZZ", "B6 ", None], dtype=object)
            data[name] = pool[rng.integers(0, len(pool), rows)]
        else:
            data[name] = rng.integers(1, 12, rows)
    as_strings = pd.DataFrame(data)
    as_categories = as_strings.astype({name: "category" for name in categories})
    recoded = flight_features.to_features(as_categories, categories)
    pd.testing.assert_frame_equal(recoded, flight_features.to_features(as_strings, categories))
    assert recoded["carrier"].isna().sum() == as_strings["carrier"].isin(["ZZZ", "B6 ", None]).sum()
    assert list(recoded["origin"].cat.categories) == ["EWR", "JFK"] and recoded["dest"].isna().all()
