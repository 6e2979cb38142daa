"""MLflow tracking and registry: parent/child runs, model logging, idempotent registration,
champion/challenger gating. Every MLflow write of the project happens here (a test holds it).

Everything is keyed so that re-running a pipeline updates what exists instead of duplicating
it: the parent run by its run key (the tuning experiment name), child runs by trial id, model
versions by source run. Nothing here logs secrets: params come from configs, tags from hashes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from infra.settings import Settings
from infra.storage import Storage, mlflow_s3_env, redact
from tuning_core.errors import ServiceUnavailable, TrackingError
from tuning_core.results import RegistryResult, TrialRecord, TuningResult
from tuning_core.workloads.base import ModelSpec

log = logging.getLogger(__name__)

TAG_RUN_KEY = "tunepipe.run_key"
TAG_TRIAL = "tunepipe.trial_id"
TAG_STAGE = "tunepipe.stage"
CHAMPION, CHALLENGER = "champion", "challenger"

# MLflow's HTTP client retries for minutes by default; stage retries (Prefect) are where we wait.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def default_tracking_uri(storage: Storage) -> str:
    """SQLite next to the data for a local root; a local SQLite file in ./.tunepipe for an S3 root."""
    base = Path(storage.root) if not storage.is_s3 else Path(".tunepipe").resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of this code's git checkout, or None (an installed package, no git, not a checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parents[1])
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def source_tags() -> dict[str, str]:
    """MLflow's standard source tag for runs and logged models; empty outside a git checkout."""
    commit = git_commit()
    return {"mlflow.source.git.commit": commit} if commit else {}


_REQUIREMENTS_CHECK = threading.Lock()


@contextlib.contextmanager
def _requirements_pinned_here() -> Iterator[None]:
    """``log_model`` without MLflow's check of the model's pip requirements against this environment.

    The check only warns, and cannot warn here: the requirements are pinned to the versions installed
    in this very process (``infra.models.pinned_requirements``). Saving the model and loading it back
    to validate the input example each run it, and it maps every module of every installed
    distribution first (``importlib.metadata.packages_distributions``: a ``stat`` of each installed
    file, ~0.4 s per retrain). MLflow has no setting for it, so its per-requirement check answers
    "satisfied" for the call; a MLflow without that function logs as it always does."""
    from mlflow.utils import requirements_utils

    with _REQUIREMENTS_CHECK:
        check = getattr(requirements_utils, "_check_requirement_satisfied", None)
        if check is None:
            yield
            return
        requirements_utils._check_requirement_satisfied = lambda requirement: None  # noqa: SLF001
        try:
            yield
        finally:
            requirements_utils._check_requirement_satisfied = check  # noqa: SLF001


class Tracker:
    """MLflow client bound to one tracking URI and the storage root's artifact location."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        import boto3
        import mlflow
        from mlflow import MlflowClient

        for k, v in _HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
        # MLflow's S3 client reads its endpoint from the environment only: this tracker's endpoint wins.
        os.environ.update(mlflow_s3_env(settings))
        # MLflow caches boto3 clients by endpoint, not by the credentials read from the environment, and
        # builds them from boto3's default session, which keeps the first credentials it resolved: after
        # keys change in-process (another bucket, rotated keys) either would sign with the old ones.
        boto3.DEFAULT_SESSION = None
        try:
            from mlflow.store.artifact.s3_artifact_repo import _cached_get_s3_client

            _cached_get_s3_client.cache_clear()
        except (ImportError, AttributeError):  # pragma: no cover - private helper moved in another MLflow
            pass
        self.settings = settings
        self.storage = storage
        self.uri = settings.mlflow_tracking_uri or default_tracking_uri(storage)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self._experiments: dict[str, str] = {}  # parent run id -> its experiment id

    # ---------------------------------------------------------------- runs
    def check(self) -> None:
        """Fail with one line if the tracking server cannot be reached."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unreachable store
            raise ServiceUnavailable(database_error_line(err)
                                     or f"MLflow tracking URI {redact(self.uri)}: unreachable ({_first_line(err)})") \
                from None

    def experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=self.artifact_location(name))

    def artifact_location(self, name: str) -> str | None:
        """Where a new experiment's artifacts go; None: the tracking server's default.

        A tracking server that serves artifacts (``mlflow server --serve-artifacts``, the local
        stack) proxies them to its own store, so its default (``mlflow-artifacts:/...``) is what
        every registry consumer can read with nothing but the tracking URI. Only without one (a
        SQLite/file store, or a server that does not serve artifacts) are artifacts written straight
        to the storage root, which readers then need access to.
        """
        if self.uri.startswith(("http://", "https://")):
            if self._serves_artifacts() or not self.storage.is_s3:
                return None
            return f"{self.storage.uri}/mlflow/{name}"
        if self.storage.is_s3:
            return f"{self.storage.uri}/mlflow/{name}"  # uploaded directly to our bucket
        return Path(self.storage.root, "mlflow", name).resolve().as_uri()

    def _serves_artifacts(self) -> bool:
        """Whether the tracking server proxies artifacts: its artifact listing answers 503 when it runs
        with ``--no-serve-artifacts``."""
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            resp = http_request(get_default_host_creds(self.uri), "/api/2.0/mlflow-artifacts/artifacts", "GET",
                                max_retries=0, timeout=30, raise_on_status=False,
                                params={"path": "tunepipe-probe"})
        except Exception as err:  # noqa: BLE001 - requests/urllib3 raise many types for an unreachable server
            raise ServiceUnavailable(f"MLflow tracking URI {redact(self.uri)}: unreachable ({_first_line(err)})") \
                from None
        if resp.status_code == 200:
            return True
        if resp.status_code in (404, 503):
            return False
        raise ServiceUnavailable(f"MLflow tracking URI {redact(self.uri)}: artifact listing answered "
                                 f"{resp.status_code}; cannot tell whether it serves artifacts")

    def parent_run(self, experiment: str, run_key: str, tags: dict[str, str], run_name: str) -> str:
        """The pipeline's parent run: found by its key (a re-run reuses it) or created."""
        exp_id = self.experiment_id(experiment)
        found = self.client.search_runs([exp_id], f"tags.`{TAG_RUN_KEY}` = '{run_key}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
        else:
            run_id = self.client.create_run(exp_id, run_name=run_name, tags={TAG_RUN_KEY: run_key}).info.run_id
        self.client.log_batch(run_id, tags=_tags({**tags, **source_tags()}))
        return run_id

    def child_run(self, parent_id: str, key_tag: str, key: str, run_name: str) -> tuple[str, bool]:
        """A child run of ``parent_id`` identified by ``key_tag = key``: (run_id, existed)."""
        exp_id = self._experiments.get(parent_id)  # one lookup per parent, not per trial
        if exp_id is None:
            exp_id = self._experiments[parent_id] = self.client.get_run(parent_id).info.experiment_id
        flt = f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`{key_tag}` = '{key}'"
        found = self.client.search_runs([exp_id], flt, max_results=1)
        if found:
            return found[0].info.run_id, True
        run = self.client.create_run(exp_id, run_name=run_name,
                                     tags={"mlflow.parentRunId": parent_id, key_tag: key, **source_tags()})
        return run.info.run_id, False

    def log_trials(self, parent_id: str, tuning: TuningResult, mutated: list[str] | None = None,
                   logged: dict[str, int] | None = None) -> int:
        """One child run per trial, written from the driver; existing ones are updated, not duplicated.

        ``logged``: trial id -> iterations this process already wrote for it (``log_trial`` during
        the tuning): those trials are not read back again.
        """
        logged = logged or {}
        return sum(self.log_trial(parent_id, t, tuning.metric, tuning.experiment_name, mutated)
                   for t in tuning.trials if logged.get(t.trial_id) != t.iterations)

    def log_trial(self, parent_id: str, t: TrialRecord, metric: str, experiment_name: str,
                  mutated: list[str] | None = None) -> bool:
        """The child run of one trial; True if anything was written.

        Parameters that PBT mutates are recorded as metric histories (``hp.<name>``) and a tag,
        since MLflow params are immutable.
        """
        from mlflow.entities import Metric, Param

        mutated = mutated or []
        run_id, existed = self.child_run(parent_id, TAG_TRIAL, t.trial_id, f"trial-{t.trial_id}")
        # A run just created holds nothing yet: read back only one that existed.
        run = self.client.get_run(run_id) if existed else None
        if run is not None and run.data.metrics.get("training_iteration") == t.iterations \
                and run.info.status == "FINISHED":
            return False  # unchanged since last time (resumed / re-run pipeline)
        first = t.history[0] if t.history else {}
        params = {k: (first.get(f"config/{k}", v) if k in mutated else v) for k, v in t.config.items()}
        have = run.data.params if run is not None else {}
        new_params = [Param(k, _param(v)) for k, v in params.items() if k not in have]
        metrics = []
        for h in t.history:
            step = int(h.get("training_iteration", 0))
            for k, v in h.items():
                if k == "training_iteration" or v is None:
                    continue
                name = f"hp.{k.removeprefix('config/')}" if k.startswith("config/") else k
                if k.startswith("config/") and k.removeprefix("config/") not in mutated:
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    metrics.append(Metric(name, float(v), 0, step))
        metrics.append(Metric("training_iteration", float(t.iterations), 0, t.iterations))
        if t.best_metric is not None:
            metrics.append(Metric(f"best_{metric}", float(t.best_metric), 0, t.iterations))
        if run is not None:  # rewrite history only from the steps not logged before
            last = int(run.data.metrics.get("training_iteration", 0))
            metrics = [m for m in metrics if m.step > last]
        tags = {"status": t.status, "tunepipe.experiment": experiment_name}
        if mutated:
            tags["tunepipe.pbt_mutated"] = ",".join(mutated)
        for i in range(0, len(metrics), 900):
            self.client.log_batch(run_id, metrics=metrics[i:i + 900],
                                  params=new_params if i == 0 else [], tags=_tags(tags) if i == 0 else [])
        if not metrics:
            self.client.log_batch(run_id, params=new_params, tags=_tags(tags))
        self.client.set_terminated(run_id, "FINISHED" if t.status != "ERROR" else "FAILED")
        return True

    def log_files(self, run_id: str, files: dict[str, bytes], artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            self.client.log_artifacts(run_id, tmp, artifact_path)

    def log_dir(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log the params the run does not have yet (MLflow params are immutable: a re-run keeps the first)."""
        from mlflow.entities import Param

        have = self.client.get_run(run_id).data.params
        self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items() if k not in have])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self.client.log_batch(run_id, tags=_tags(tags))

    def touch(self, run_id: str) -> None:
        """An empty write: the run's end time moves past its children's (the UI sorts by it)."""
        self.client.log_batch(run_id, tags=[])

    def log_model(self, run_id: str, spec: ModelSpec) -> str:
        """Log a workload's model into ``run_id`` (MLflow models from code), linked to its lineage: the
        datasets as the run's inputs and the test metrics with the model's id and the test dataset, so
        the model page shows them. Returns the model URI."""
        import mlflow

        from infra import models

        kwargs = models.log_model_kwargs(spec)
        datasets = models.lineage_datasets(spec)
        # mlflow.start_run(run_id=...) refuses to resume a run of another experiment than the one an
        # earlier set_experiment() in this process selected: make the run's own experiment the active one.
        mlflow.set_experiment(experiment_id=self.client.get_run(run_id).info.experiment_id)
        with mlflow.start_run(run_id=run_id), _requirements_pinned_here():
            info = mlflow.pyfunc.log_model(**kwargs)
            with models.dataset_warnings_off():  # logging a dataset infers its schema
                for context, dataset in datasets.items():
                    mlflow.log_input(dataset, context=context)
            if spec.metrics:
                mlflow.log_metrics({k: float(v) for k, v in spec.metrics.items()}, step=0, model_id=info.model_id,
                                   dataset=datasets.get("test"))
        return info.model_uri

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        uri = redact(self.uri)  # links end up in summaries and Prefect artifacts
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
        return f"{uri} experiment {run.info.experiment_id} run {run_id}"

    # ---------------------------------------------------------------- registry
    def register(self, name: str, run_id: str, model_uri: str, tags: dict[str, str]) -> str:
        """Register ``model_uri`` as a version of ``name``; idempotent per source run.

        MLflow's own ``register_model`` creates a new version on every call, so we look for a
        version from the same run first.
        """
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description="Registered by tunepipe")
        existing = self.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if existing:
            version = str(max(int(v.version) for v in existing))
            log.info("model %s version %s already registered for run %s", name, version, run_id)
        else:
            with _notices_to_log():
                version = str(mlflow.register_model(model_uri, name, tags=_strtags(tags)).version)
        return version

    def gate(self, name: str, version: str, challenger_value: float, metric: str, mode: str, margin: float,
             evaluate_version: Callable[[str], float], force: bool = False) -> RegistryResult:
        """Set ``challenger`` and promote to ``champion`` only if it beats the current champion.

        The current champion is re-evaluated on today's test split (``evaluate_version``), not
        trusted from old tags, unless its test metric was measured on this very data version (the
        content hash names the test split, so the number cannot differ; reruns on unchanged data
        then skip loading and scoring the champion). The decision, both metrics and the previous champion are written as
        tags on the version. A version that already has a decision keeps it (re-runs change nothing).
        """
        from mlflow.exceptions import MlflowException

        mv = self.client.get_model_version(name, version)
        if "tunepipe.decision" in mv.tags and not force:
            return self._result(name, version, mv.tags["tunepipe.decision"], mv.tags.get("tunepipe.previous_champion"))
        try:
            champion = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            champion = None
        tags = {f"tunepipe.challenger_{metric}": f"{challenger_value:.6f}"}
        if champion is None:
            promote, decision, previous = True, "first version: promoted", None
        elif str(champion.version) == str(version):  # MLflow's stores return versions as int
            promote, decision, previous = True, "already champion", str(version)
        else:
            previous = str(champion.version)
            champ_value = _score_on_same_data(champion, mv, metric)
            if champ_value is None:
                champ_value = evaluate_version(f"models:/{name}/{champion.version}")
            tags[f"tunepipe.champion_{metric}"] = f"{champ_value:.6f}"
            delta = challenger_value - champ_value if mode == "max" else champ_value - challenger_value
            if force:
                promote, decision = True, f"forced promotion (delta {delta:+.6f})"
            elif delta >= margin and delta > 0:
                promote, decision = True, f"promoted: beats champion v{previous} by {delta:+.6f} (margin {margin})"
            else:
                promote, decision = False, f"kept champion v{previous}: delta {delta:+.6f} < margin {margin}"
        if previous:
            tags["tunepipe.previous_champion"] = previous
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, v)
        if promote:
            self.client.set_registered_model_alias(name, CHAMPION, version)
            try:
                if str(self.client.get_model_version_by_alias(name, CHALLENGER).version) == str(version):
                    self.client.delete_registered_model_alias(name, CHALLENGER)
            except MlflowException:
                pass
        else:
            self.client.set_registered_model_alias(name, CHALLENGER, version)
        # The decision goes last: it marks the gate as done. Written before the aliases, a run killed in
        # between left a decision whose alias was never set, and its rerun returned that decision as is.
        self.client.set_model_version_tag(name, version, "tunepipe.decision", decision)
        return self._result(name, version, decision, previous)

    def _result(self, name: str, version: str, decision: str, previous: str | None) -> RegistryResult:
        mv = self.client.get_model_version(name, version)
        return RegistryResult(model_name=name, version=version, aliases=sorted(mv.aliases), decision=decision,
                              promoted=CHAMPION in mv.aliases, champion_before=previous)

    def model_workload(self, name: str, alias: str) -> str:
        """The workload whose pipeline registered ``name@alias``: the version's tag, or for versions
        registered before that tag, the ``workload`` tag of the pipeline's parent run."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            raise TrackingError(f"model registry {redact(self.uri)}: no version of {name!r} has alias {alias!r}") \
                from None
        if "tunepipe.workload" in mv.tags:
            return mv.tags["tunepipe.workload"]
        parent = mv.tags.get("parent_run") or self.client.get_run(mv.run_id).data.tags.get("mlflow.parentRunId")
        return self.client.get_run(parent).data.tags.get("workload", "") if parent else ""

    def champion_config(self, name: str) -> dict[str, Any] | None:
        """The searched config of the current champion (warm start), or None."""
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return None
        raw = mv.tags.get("tunepipe.best_config")
        return json.loads(raw) if raw else None


def _score_on_same_data(champion: Any, challenger: Any, metric: str) -> float | None:
    """The champion's registered test ``metric`` if it was registered on the challenger's data
    version (both carry ``data_version`` and ``test_<metric>`` tags from ``register``), else None."""
    data = challenger.tags.get("data_version")
    value = champion.tags.get(f"test_{metric}")
    if not data or value is None or champion.tags.get("data_version") != data:
        return None
    try:
        return float(value)
    except ValueError:
        return None


@contextlib.contextmanager
def _notices_to_log() -> Iterator[None]:
    """MLflow's ``register_model`` prints its notices to stderr ("Registered model 'x' already exists.
    Creating a new version of this model...", "Created version '3' of model 'x'.") whatever the log level:
    on every run, between the CLI's own lines, which say the version already. They go to this log (INFO)."""
    from mlflow.tracking._model_registry import fluent

    printed = getattr(fluent, "eprint", None)
    if printed is None:  # pragma: no cover - another MLflow: its notices stay as they are
        yield
        return
    fluent.eprint = lambda *args, **kwargs: log.info("mlflow: %s", " ".join(str(a) for a in args))
    try:
        yield
    finally:
        fluent.eprint = printed


def database_error_line(err: BaseException) -> str | None:
    """One line for an error of MLflow's database store anywhere in ``err``'s chain, or None.

    SQLAlchemy's own message is the driver's error, then the SQL statement and a link to its docs: the
    CLI's line would otherwise end with the link. A locked SQLite file says what locks it and what helps.
    """
    import sys

    sa_exc = sys.modules.get("sqlalchemy.exc")  # not imported: the error cannot come from SQLAlchemy
    seen: BaseException | None = err
    while sa_exc is not None and seen is not None and not isinstance(seen, sa_exc.DBAPIError):
        seen = seen.__cause__ or seen.__context__
    if sa_exc is None or seen is None:
        return None
    mlflow = sys.modules.get("mlflow")
    uri = redact(mlflow.get_tracking_uri() if mlflow else os.environ.get("MLFLOW_TRACKING_URI", "?"))
    reason = _first_line(seen.orig) if seen.orig is not None else _first_line(seen)
    if "database is locked" in reason:
        return (f"MLflow tracking store {uri}: database is locked (another process held its write lock for "
                f"over 20 s: a stopped or hung run?); SQLite takes one writer at a time, so many concurrent "
                f"runs want a tracking server (MLFLOW_TRACKING_URI=http://...)")
    return f"MLflow tracking store {uri}: {reason}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return redact(text[0][:300] if text else type(err).__name__)


def _param(v: Any) -> str:
    return str(v)[:6000]


def _strtags(tags: dict[str, Any]) -> dict[str, str]:
    return {k: str(v)[:5000] for k, v in tags.items() if v is not None}


def _tags(tags: dict[str, Any]) -> list[Any]:
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in _strtags(tags).items()]
