"""Bad inputs through the CLI: every one exits 2 with one stderr line naming the problem, and writes nothing.

One table of cases across CSV content, schemas, IDX files, config and search space, storage URIs,
credentials and the tracking server. Each case runs the real ``tunepipe`` command in-process (typer's
CliRunner) against a throwaway storage root and MLflow SQLite file, then checks that no data version,
no Ray experiment and no registered model version exists afterwards. ``run`` cases must fail in the
pre-run checks (config, data source, storage, tracking), before Prefect or Ray start: each case takes
well under a second, except the unreachable tracking server (MLflow's capped HTTP retries).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from typer.testing import CliRunner

# flows.workloads is imported here, not inside CliRunner: Prefect binds its log handlers to the sys.stderr of
# the moment, which CliRunner swaps and closes.
import flows.workloads  # noqa: F401
from flows.cli import app
from tests.conftest import ASA_SAMPLE, free_port

ASA_HEADER = ASA_SAMPLE.open().readline()
ASA_ROWS = "".join(ASA_SAMPLE.open().readlines()[1:200])
IDX_NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


# --------------------------------------------------------------------------- input makers
def _file(name: str, text: str | bytes) -> Callable[[Path], str]:
    def make(tmp: Path) -> str:
        path = tmp / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return str(path)

    return make


def _asa_with(row: int, column: str, value: str) -> str:
    """The first ASA sample rows with one cell replaced."""
    lines = ASA_ROWS.splitlines()
    cells = lines[row].split(",")
    cells[ASA_HEADER.strip().split(",").index(column)] = value
    lines[row] = ",".join(cells)
    return ASA_HEADER + "\n".join(lines) + "\n"


def _asa_cut(*rows: int) -> str:
    """The first ASA sample rows, those in ``rows`` cut to 12 of their 29 fields (ragged rows)."""
    lines = ASA_ROWS.splitlines()
    for row in rows:
        lines[row] = ",".join(lines[row].split(",")[:12])
    return ASA_HEADER + "\n".join(lines) + "\n"


def _idx_bytes(arr: np.ndarray, magic_dtype: int = 0x08) -> bytes:
    header = bytes([0, 0, magic_dtype, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _idx_set(edit: Callable[[dict[str, bytes]], None] | None = None) -> Callable[[Path], str]:
    """A small valid IDX set (torchvision layout, gzipped), then ``edit`` applied to the file bytes."""
    def make(tmp: Path) -> str:
        rng = np.random.default_rng(0)
        files = {
            "train_images": _idx_bytes(rng.integers(0, 255, (40, 28, 28))),
            "train_labels": _idx_bytes(np.arange(40) % 10),
            "test_images": _idx_bytes(rng.integers(0, 255, (10, 28, 28))),
            "test_labels": _idx_bytes(np.arange(10) % 10),
        }
        if edit:
            edit(files)
        raw = tmp / "fm" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for role, data in files.items():
            (raw / f"{IDX_NAMES[role]}.gz").write_bytes(gzip.compress(data))
        return str(tmp / "fm")

    return make


def _set(**changes: bytes) -> Callable[[dict[str, bytes]], None]:
    return lambda files: files.update(changes)


def _table(name: str, **columns: list) -> Callable[[Path], str]:
    """A small table (CSV or Parquet, by the name's suffix) with the given columns."""
    def make(tmp: Path) -> str:
        import pandas as pd

        frame = pd.DataFrame(columns)
        path = tmp / name
        frame.to_parquet(path, index=False) if name.endswith(".parquet") else frame.to_csv(path, index=False)
        return str(path)

    return make


def _yaml(text: str) -> Callable[[Path], str]:
    return _file("cfg.yaml", text)


def _space(entry: str) -> Callable[[Path], str]:
    return _space_entry("eta", entry)


def _space_entry(name: str, entry: str) -> Callable[[Path], str]:
    return _yaml(f"tune:\n  space:\n    {name}: {entry}\n")


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    """One bad input: the CLI arguments (built in the case's temp folder) and the words the error must contain."""

    args: Callable[[Path], list[str]]
    expect: str
    env: dict[str, str] = field(default_factory=dict)  # "{moto}" / "{bucket}" / "{port}" are filled in
    s3: str | None = None  # None | "moto" | "moto-auth": needs the moto server (with auth enforced)


def run_flights(make: Callable[[Path], str] | None = None, *extra: str, option: str = "--data") -> Callable:
    return lambda tmp: ["run", "flights", *([option, make(tmp)] if make else []), "--num-samples", "2", *extra]


def prepare_flights(make: Callable[[Path], str]) -> Callable:
    return lambda tmp: ["prepare", "flights", "--data", make(tmp)]


def run_fashion(make: Callable[[Path], str]) -> Callable:
    return lambda tmp: ["run", "fashion-mnist", "--data", make(tmp), "--num-samples", "2"]


def run_tabular(make: Callable[[Path], str], *extra: str) -> Callable:
    return lambda tmp: ["run", "tabular", "--data", make(tmp), "--num-samples", "2", *extra]


def with_config(make: Callable[[Path], str]) -> Callable:
    return lambda tmp: ["run", "flights", "--data", str(ASA_SAMPLE), "--config", make(tmp)]


def fashion_with_config(make: Callable[[Path], str]) -> Callable:
    return lambda tmp: ["run", "fashion-mnist", "--data", _idx_set()(tmp), "--config", make(tmp)]


CASES: dict[str, Case] = {
    # ---- CSV content and schema
    "empty file": Case(run_flights(_file("empty.csv", "")), "empty file"),
    "header only": Case(run_flights(_file("header.csv", ASA_HEADER)), "no data rows (header only)"),
    "unknown schema": Case(run_flights(_file("other.csv", "a,b,c\n1,2,3\n")), "unknown flights schema"),
    "semicolon delimiter": Case(run_flights(_file("semi.csv", ASA_HEADER.replace(",", ";") + "2008;1;3\n")),
                                "';'-separated"),
    # Values deep inside a file are only seen by the data stage itself: `prepare` shows its error.
    "non-numeric delays": Case(prepare_flights(_file("late.csv", _asa_with(30, "ArrDelay", "late"))),
                               "column 'ArrDelay' is not numeric (example value 'late')"),
    "corrupt gzip": Case(run_flights(_file("bad.csv.gz", gzip.compress(ASA_HEADER.encode())[:20] + b"\x00junk" * 40)),
                         "corrupt compressed file"),
    "corrupt zip": Case(run_flights(_file("bad.zip", b"PK\x03\x04" + b"garbage" * 20)), "not a readable zip file"),
    "missing file": Case(run_flights(lambda tmp: str(tmp / "nope.csv")), "no such file or folder"),
    "glob matching nothing": Case(run_flights(lambda tmp: f"{tmp}/flights-*.csv"), "glob matched no files"),
    "too few rows to split": Case(prepare_flights(_file("few.csv", ASA_HEADER + ASA_ROWS.split("\n", 2)[0])),
                                  "too few to split"),
    # Rows that do not split into the file's columns: skipped up to data.max_bad_row_fraction, then an error.
    "too many malformed rows": Case(prepare_flights(_file("ragged.csv", _asa_cut(10, 11, 12))),
                                    "3 of 199 rows are malformed (1.508%), more than data.max_bad_row_fraction=0.001; "
                                    "first at line 12: expected 29 columns, got 12"),
    "malformed row with bad_rows: error": Case(
        lambda tmp: ["prepare", "flights", "--data", _file("cut.csv", _asa_cut(198))(tmp),
                     "--config", _yaml("data:\n  bad_rows: error\n")(tmp)],
        "line 200: expected 29 columns, got 12"),
    "headerless file narrower than its stated layout": Case(
        lambda tmp: ["run", "flights", "--data", _file("export.csv", "2008,1,3,WN,335,IAD,TPA\n" * 30)(tmp),
                     "--config", _yaml("data:\n  header: absent\n  schema: asa\n")(tmp), "--num-samples", "2"],
        "the first line has 7 fields; the asa layout has 29 columns"),
    # ---- IDX files
    "idx bad magic": Case(run_fashion(_idx_set(_set(train_labels=b"\x00\x00\x08\x03" + b"\x00" * 40))),
                          "bad magic number 2051, expected 2049"),
    "idx truncated": Case(run_fashion(_idx_set(lambda f: f.update(train_images=f["train_images"][:-100]))),
                          "truncated: header says shape [40, 28, 28]"),
    "idx labels out of range": Case(run_fashion(_idx_set(_set(train_labels=_idx_bytes(np.full(40, 12))))),
                                    "label 12 at index 0, expected labels 0..9"),
    "idx image/label count mismatch": Case(run_fashion(_idx_set(_set(test_labels=_idx_bytes(np.arange(9) % 10)))),
                                           "10 images but 9 labels"),
    "idx files missing": Case(run_fashion(lambda tmp: (tmp / "empty").mkdir() or str(tmp / "empty")),
                              "no IDX files found"),
    # ---- tables (the tabular workload)
    "tabular: no such label column": Case(
        run_tabular(_table("t.csv", x=[1, 2, 3, 4], y=[0, 1, 0, 1]), "--label", "target"),
        "data.label 'target': no such column in"),
    "tabular: one class only": Case(
        run_tabular(_table("t.csv", x=list(range(20)), y=["yes"] * 20), "--label", "y"),
        "data.label 'y': one class only ('yes')"),
    "tabular: label all missing": Case(
        run_tabular(_table("t.csv", x=list(range(20)), y=[None] * 20), "--label", "y"),
        "data.label 'y': all 20 values are missing"),
    "tabular: unsupported column type": Case(
        run_tabular(_table("t.parquet", x=[[1, 2]] * 20, y=[0, 1] * 10), "--label", "y"),
        "column 'x' has type list<element: int64>, which the tabular workload cannot use as a feature"),
    "tabular: binary stated, three classes found": Case(
        run_tabular(_table("t.csv", x=list(range(30)), y=["a", "b", "c"] * 10), "--label", "y", "--task", "binary"),
        "task binary, but 3 classes"),
    "tabular: label not given": Case(run_tabular(_table("t.csv", x=[1, 2], y=[0, 1])), "data.label: Field required"),
    "tabular: only an identifier column besides the label": Case(
        run_tabular(_table("t.csv", user=[f"u{i:04d}" for i in range(300)], y=[0, 1] * 150), "--label", "y"),
        "every feature column looks like an identifier (['user'])"),
    # ---- config and search space
    "loguniform low <= 0": Case(with_config(_space("{type: loguniform, low: 0, high: 1}")), "needs low > 0"),
    "low >= high": Case(with_config(_space("{type: uniform, low: 2, high: 1}")), "needs low < high"),
    "empty choice": Case(with_config(_space("{type: choice, values: []}")), "needs a non-empty 'values' list"),
    "unknown space type": Case(with_config(_space("{type: gaussian, low: 0, high: 1}")), "unknown type 'gaussian'"),
    # ---- hyperparameters the trainable would ignore or refuse (checked by xgboost / torch themselves)
    "misspelt xgboost parameter": Case(with_config(_space_entry("max_dpth", "{type: randint, low: 3, high: 8}")),
                                       "'max_dpth' (did you mean 'max_depth'?)"),
    "xgboost parameter out of bounds": Case(
        with_config(_space_entry("subsample", "{type: uniform, low: 0.5, high: 1.5}")),
        "(every entry at its high end): xgboost refuses it: value 1.5 for Parameter subsample"),
    "warm-start point out of bounds": Case(with_config(_yaml("tune:\n  points_to_evaluate: [{max_depth: -1}]\n")),
                                           "search space (points_to_evaluate[0]): xgboost refuses it: value -1"),
    "misspelt PBT mutation": Case(
        with_config(_yaml("tune:\n  scheduler: pbt\n  scheduler_options:\n    hyperparam_mutations:\n"
                          "      etaa: {type: uniform, low: 0.1, high: 0.3}\n")),
        "search space (scheduler_options.hyperparam_mutations, every entry at its low end): xgboost would "
        "ignore these in every trial (unknown names, or unused by this booster): 'etaa' (did you mean 'eta'?)"),
    "unknown CNN in the space": Case(
        fashion_with_config(_space_entry("model", "{type: choice, values: [cnn, vgg]}")),
        "search space (every entry at its high end): model: one of ['cnn', 'resnet18'], got 'vgg'"),
    "unknown scheduler": Case(run_flights(None, "--scheduler", "fastest"),
                              "tune.scheduler: Input should be 'fifo', 'asha', 'hyperband', 'median' or 'pbt', "
                              "got 'fastest'"),
    "unknown search": Case(run_flights(None, "--search", "bayes"),
                           "tune.search: Input should be 'random', 'grid', 'hyperopt' or 'optuna', got 'bayes'"),
    "unknown CNN": Case(lambda tmp: ["run", "fashion-mnist", "--data", _idx_set()(tmp), "--model", "vgg"],
                        "model: Input should be 'cnn' or 'resnet18', got 'vgg'"),
    "num_samples 0": Case(lambda tmp: ["run", "flights", "--num-samples", "0"], "tune.num_samples"),
    "negative time budget": Case(with_config(_yaml("tune:\n  time_budget_s: -5\n")), "tune.time_budget_s"),
    "bad YAML": Case(with_config(_yaml("tune: [unclosed\n")), "not valid YAML"),
    "YAML not a mapping": Case(with_config(_yaml("- a\n- b\n")), "expected a mapping at the top level, got list"),
    "unknown config key": Case(with_config(_yaml("tune:\n  num_smaples: 3\n")), "tune.num_smaples"),
    # 64 data-parallel workers of 1 CPU: more than the local Ray's CPUs, refused before anything is written.
    "data-parallel trial needs more CPUs than local Ray has": Case(
        with_config(_yaml("tune:\n  resources: {workers_per_trial: 64}\n")),
        "tune.resources: one trial needs cpu=64, gpu=0, but the local Ray"),
    "gpu with workers_per_trial": Case(
        with_config(_yaml("tune:\n  resources: {workers_per_trial: 2, gpu: 1}\n")),
        "data-parallel trials run on CPU workers only"),
    # No machine here has 64 GPUs: Tune would keep such a trial pending forever.
    "trial needs more GPUs than local Ray has": Case(
        with_config(_yaml("tune:\n  resources: {cpu: 1, gpu: 64}\n")),
        "tune.resources: one trial needs cpu=1, gpu=64, but the local Ray"),
    # Checked before the run, not at registration after the tuning and the retrain.
    "registry metric the model is not evaluated on": Case(with_config(_yaml("registry:\n  metric: f1\n")),
                                                          "registry.metric 'f1': the flights model is evaluated"),
    "config file missing": Case(lambda tmp: ["run", "flights", "--config", str(tmp / "none.yaml")], "not found"),
    "model name with illegal characters": Case(run_flights(None, "--model-name", "my model/v1"),
                                               "registry.model_name"),
    # ---- storage URIs, credentials, tracking
    "storage URI without bucket": Case(run_flights(lambda tmp: "s3://", option="--storage"),
                                       "expected s3://bucket[/prefix]"),
    "storage bucket missing": Case(run_flights(lambda tmp: "s3://no-such-bucket-tp/root", option="--storage"),
                                   "bucket 'no-such-bucket-tp' does not exist", s3="moto"),
    "source bucket missing": Case(run_flights(lambda tmp: "s3://no-such-source-tp/in/flights.csv"),
                                  "bucket 'no-such-source-tp' does not exist", s3="moto"),
    "wrong S3 credentials": Case(run_flights(lambda tmp: "s3://{bucket}/root", option="--storage"),
                                 "denied; check the S3 credentials", s3="moto-auth"),
    # The data stage's own checks with an S3 storage root: nothing lands in the bucket either.
    "non-numeric delays, S3 root": Case(
        lambda tmp: ["prepare", "flights", "--data", _file("late.csv", _asa_with(30, "ArrDelay", "late"))(tmp),
                     "--storage", "s3://{bucket}/root"], "column 'ArrDelay' is not numeric", s3="moto"),
    "too many malformed rows, S3 root": Case(
        lambda tmp: ["prepare", "flights", "--data", _file("ragged.csv", _asa_cut(10, 11, 12))(tmp),
                     "--storage", "s3://{bucket}/root"], "more than data.max_bad_row_fraction", s3="moto"),
    "unreachable MLflow": Case(run_flights(lambda tmp: str(ASA_SAMPLE)), "unreachable",
                               env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:{port}"}),
}
# FashionMNIST runs past its --model choice reach the torch trainable's checks first: without the [torch]
# extra (`make test-py313`) they stop at "fashion-mnist needs torch" (tests/unit/test_packaging.py).
NEEDS_TORCH = {"idx bad magic", "idx truncated", "idx labels out of range", "idx image/label count mismatch",
               "idx files missing", "unknown CNN in the space"}


# --------------------------------------------------------------------------- the checks
@pytest.fixture
def restored_process_state():
    """Environment and MLflow's process-wide URIs as they were (the CLI sets defaults in both)."""
    import os

    import mlflow

    env = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(env)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _written(storage: str, settings) -> list[str]:
    """Every object under the storage root, locally or on S3: data versions (finished or not), Ray
    experiments, MLflow artifacts, predictions and experiment leases alike."""
    from infra.storage import filesystem_for

    fs, root = filesystem_for(storage, settings)
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [i.path.removeprefix(root).lstrip("/") for i in infos if i.type == pafs.FileType.File]


def _mlflow_written(db: Path) -> list[str]:
    """What the MLflow store holds beyond a new store's Default experiment: experiments (deleted ones
    too), runs, registered models and their versions."""
    if not db.exists():
        return []
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = f"sqlite:///{db}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    runs = client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)
    return ([f"experiment {e.name}" for e in experiments if e.name != "Default"] +
            [f"run {r.info.run_id}" for r in runs] +
            [f"model {m.name}" for m in client.search_registered_models()] +
            [f"model version {v.name} v{v.version}" for v in client.search_model_versions()])


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(name, tmp_path, local_settings, restored_process_state,
                                                           monkeypatch, request):
    from infra.settings import Settings, get_settings

    if name in NEEDS_TORCH:
        pytest.importorskip("torch")
    case = CASES[name]
    fill = {"{port}": str(free_port())}
    if case.s3:
        fill["{bucket}"] = request.getfixturevalue("s3_settings").storage.removeprefix("s3://").split("/")[0]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.replace("{port}", fill["{port}"]))
    args = case.args(tmp_path)
    for key, value in fill.items():
        args = [a.replace(key, value) for a in args]
    storage = next((args[i + 1] for i, a in enumerate(args) if a == "--storage"), None)
    storage = storage or Settings().storage
    if case.s3 == "moto-auth":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-for-tunepipe")
        request.getfixturevalue("moto_auth_switch")(True)
    get_settings.cache_clear()

    result = CliRunner().invoke(app, args)

    if case.s3 == "moto-auth":
        request.getfixturevalue("moto_auth_switch")(False)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert case.expect in lines[0]
    assert "wrong-secret-for-tunepipe" not in result.output
    assert result.stdout == ""
    if not storage.endswith("//"):  # a malformed URI names no place to look
        assert _written(storage, Settings()) == []
    assert _mlflow_written(tmp_path / "mlflow.db") == []
