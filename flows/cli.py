"""The ``tunepipe`` command line: a thin Typer layer over the flows.

Exit codes: 0 success, 2 user error (a ``TunepipeError``: one line on stderr), 3 the experiment is busy
(another run of the same data and tune config holds its lease; ``--wait-lease SECONDS`` waits for it),
1 anything else.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from tuning_core.config import DEFAULT_MODEL_NAME, SCHEDULERS, SEARCHERS
from tuning_core.workloads import WORKLOADS
from tuning_core.workloads.base import CliOption, Workload

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Prefect + Ray Tune + MLflow tuning pipelines.")
run_app = typer.Typer(no_args_is_help=True, help="Run a whole pipeline (prepare → tune → retrain → register).")
prepare_app = typer.Typer(no_args_is_help=True, help="Run only the data stage.")
stack_app = typer.Typer(no_args_is_help=True, help="The local stack: S3, MLflow server, Prefect server + worker.")
app.add_typer(run_app, name="run")
app.add_typer(prepare_app, name="prepare")
app.add_typer(stack_app, name="stack")

log = logging.getLogger("tunepipe")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tunepipe {version('tunepipe')}")
        raise typer.Exit()


@app.callback()
def _root(show_version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                            help="print the version and exit")) -> None:
    pass


def _quiet_env() -> None:
    from infra.process_env import apply_quiet_env

    apply_quiet_env()


def _set_storage(storage: str | None) -> None:
    if storage:
        os.environ["TUNEPIPE_STORAGE"] = storage
    from infra.settings import get_settings

    get_settings.cache_clear()


def _set_lease_wait(seconds: float | None) -> None:
    """``--wait-lease``: how long to wait for another run's hold on the same experiment (infra.lease)."""
    if seconds is not None:
        os.environ["TUNEPIPE_LEASE_WAIT_S"] = str(seconds)
        from infra.settings import get_settings

        get_settings.cache_clear()


def _overrides(options: tuple[CliOption, ...] = (), **kw: Any) -> dict[str, Any]:
    """The config values the command line gives: the shared options, then the workload's own
    (``CliOption.field``, a dotted config path)."""
    data = {"source": kw.get("data")}
    tune = {"num_samples": kw.get("num_samples"), "search": kw.get("search"), "scheduler": kw.get("scheduler"),
            "max_iterations": kw.get("max_iterations"), "seed": kw.get("seed"),
            "max_concurrent_trials": kw.get("max_concurrent"),
            "resources": {"workers_per_trial": kw.get("workers_per_trial")}}
    registry = {"model_name": kw.get("model_name"), "force_promote": True if kw.get("force_promote") else None}
    out = {"data": data, "tune": tune, "registry": registry, "run_id": kw.get("run_id"),
           "warm_start_from_champion": True if kw.get("warm_start") else None}
    for option in options:
        *parents, leaf = option.field.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = kw.get(option.param)
    return out


def _config(model: type, config: Path | None, defaults: dict[str, Any], overrides: dict[str, Any]) -> Any:
    from tuning_core.config import build_config, load_yaml, merge

    base = merge(defaults, load_yaml(config)) if config else defaults
    return build_config(model, merge(base, overrides), where=f"({config})" if config else "")


def _guard(fn):
    """Turn errors into one line and the documented exit codes."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from tuning_core.errors import TunepipeError

        try:
            return fn(*args, **kwargs)
        except TunepipeError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as err:  # noqa: BLE001 - a bug: say so in one line, details in the log
            from infra.storage import redact
            from infra.tracking import database_error_line

            log.debug("unexpected error", exc_info=True)
            if (line := database_error_line(err)) is not None:  # the tracking store's database, not a bug
                typer.echo(f"error: {line}", err=True)
                raise typer.Exit(1) from None
            lines = [ln for ln in str(err).splitlines() if ln.strip()]
            # Multi-line errors (Ray's TuneError carries a traceback) end with the actual message.
            typer.echo(f"internal error ({type(err).__name__}): {redact(lines[-1].strip() if lines else '')}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t, r, g = summary["tuning"], summary["retrain"], summary["registry"]
    table = Table(title=f"tunepipe {summary['workload']}", show_header=False)
    d = summary["data"]
    table.add_row("data version", f"{d['version']} ({d['schema']}) {d['rows']}")
    table.add_row("experiment", f"{t['experiment_uri']} ({t['num_trials']} trials, resumed={t['resumed']})")
    table.add_row("search", f"{t['search']} + {t['scheduler']}")
    table.add_row(f"best valid {t['best_metric']['name']}", f"{t['best_metric']['value']:.4f}")
    for k, v in r["test_metrics"].items():
        table.add_row(f"test {k}", f"{v:.4f} (default {r['baseline_test_metrics'].get(k, float('nan')):.4f})")
    table.add_row("model", f"{g['model_name']} v{g['version']} aliases={g['aliases']}")
    table.add_row("decision", g["decision"])
    table.add_row("mlflow run", r["mlflow_run_id"])
    times = summary.get("timings") or {}
    if times:
        table.add_row("wall seconds", ", ".join(f"{k.removesuffix('_s')} {v:.1f}" for k, v in times.items()))
    Console(stderr=True).print(table)


def _progress_bar():
    """A rich progress bar fed by the tune stage's progress events."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tasks import workloads

    bar = Progress(TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), transient=False)
    state: dict[str, Any] = {}

    def listener(event: dict[str, Any]) -> None:
        if "task" not in state:
            state["task"] = bar.add_task("", total=event["total"])
        best = event["best"]
        bar.update(state["task"], completed=event["done"],
                   description=f"best {event['metric']}={best:.4f}" if best is not None else "")

    workloads.PROGRESS_LISTENERS.append(listener)
    return bar


def _start_prefect_api() -> Any:
    """Start Prefect's ephemeral API (no ``PREFECT_API_URL``) in a thread, so that its ~5-8 s of
    start-up run in its own process while this one imports and checks; returns the thread to join
    before the flow starts, or None when a server is configured.

    The flow's client would start the same server on first use: Prefect keeps it as a process-wide
    singleton (``SubprocessASGIServer()``), so the flow finds it running and stops it at exit.
    """
    import threading

    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None

    def start() -> None:
        from prefect.server.api.server import SubprocessASGIServer

        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's client tries again and reports the error itself
            log.debug("starting Prefect's ephemeral API ahead of the flow failed", exc_info=True)

    thread = threading.Thread(target=start, name="tunepipe-prefect-api", daemon=True)
    thread.start()
    atexit.register(_stop_prefect_api, thread)
    return thread


def _stop_prefect_api(thread: Any) -> None:
    """At exit: let a start still under way finish, then stop the server. Prefect registers its own
    stop only once the process is up, so a command ending earlier (bad input, exit 2) would leave
    the server running with no parent; after Prefect's own stop this is a no-op."""
    thread.join(timeout=60)
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        # Its "Stopping temporary server" line may meet a log stream already closed at exit (an in-process
        # CliRunner under pytest): logging then prints a traceback for a line nobody reads.
        raising, logging.raiseExceptions = logging.raiseExceptions, False
        try:
            server.SubprocessASGIServer().stop()
        finally:
            logging.raiseExceptions = raising


# The ephemeral API's start-up thread, begun before the flow modules are even imported.
_API: dict[str, Any] = {}


def _start_prefect_api_early(check: bool) -> None:
    if not check:
        _quiet_env()
        _API["thread"] = _start_prefect_api()


def _since_process_start() -> float:
    import time

    import psutil

    return time.time() - psutil.Process().create_time()


def _run(flow_fn: Any, cfg: Any, summary_json: Path | None, check: bool = False) -> None:
    _quiet_env()
    from infra.settings import get_settings
    from tasks import workloads

    api = None if check else _API.pop("thread", None) or _start_prefect_api()
    ctx = workloads.Context.build(get_settings())
    try:
        # Bad input: exit 2 before any write; completed from the data; the local Ray starts once the
        # config and data have passed, and is stopped again if the tracking check fails.
        cfg = workloads.preflight(cfg, ctx, warm=not check)
    except BaseException:
        from infra.ray_cluster import stop_started_ahead

        stop_started_ahead()
        raise
    if check:
        from infra.storage import redact

        t = cfg.tune
        print(redact(f"checks passed: {cfg.workload} config, search space, data source, storage {ctx.storage.uri} "
                     f"and tracking {ctx.tracker().uri}; would run {t.num_samples} trials of {t.search}+{t.scheduler}"))
        return
    if api is not None:
        api.join()  # the flow's client finds the ephemeral API running
    from infra import prefect_api

    prefect_api.wait_ready()  # the local API the console script started first (infra/prefect_api.py)
    bar = _progress_bar() if sys.stderr.isatty() else None
    if bar:
        with bar:
            summary = flow_fn(cfg)
    else:
        summary = flow_fn(cfg)
    summary.setdefault("timings", {})["process_s"] = round(_since_process_start(), 2)
    if summary_json:
        summary_json.parent.mkdir(parents=True, exist_ok=True)
        summary_json.write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)


CONFIG = typer.Option(None, "--config", help="YAML file with the pipeline config")
STORAGE = typer.Option(None, "--storage", help="storage root: folder or s3://bucket/prefix (TUNEPIPE_STORAGE)")
WAIT_LEASE = typer.Option(None, "--wait-lease", min=0, metavar="SECONDS",
                          help="if another run holds this experiment, wait up to SECONDS for it "
                               "(TUNEPIPE_LEASE_WAIT_S; default 0: stop at once with exit code 3)")
CHECK = typer.Option(False, "--check", help="only the pre-run checks (config, search space, data source, storage, "
                                            "tracking), then exit: 0 if the run would start, 2 if not")


# Options default to None (= "not given", so a --config file's value stands); the help shows the
# pipeline's own default instead. Choices come from the registries; a wrong name is refused by the
# config in one line (exit 2), like every other bad value.
def _choice(flag: str, names: Any, default: str, help: str) -> Any:
    return typer.Option(None, flag, metavar="[" + "|".join(names) + "]", show_default=default, help=help)


def _opt(flag: str, default: Any, help: str | None = None) -> Any:
    return typer.Option(None, flag, show_default=str(default), help=help)


SEARCH_HELP, SCHEDULER_HELP = "search algorithm", "early-stopping scheduler"


def _param(name: str, default: Any, annotation: Any) -> Any:
    import inspect

    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _workload_params(workload: Workload, command: str) -> list[Any]:
    """The workload's own shortcuts for ``command`` as typer parameters (``CliOption``)."""
    params = []
    for option in workload.cli_options:
        if command not in option.commands:
            continue
        default = (_choice(option.flag, option.choices, option.shown_default, option.help) if option.choices
                   else _opt(option.flag, option.shown_default, option.help) if option.shown_default is not None
                   else typer.Option(None, option.flag, help=option.help))
        params.append(_param(option.param, default, option.type | None))
    return params


def _command(fn: Any, name: str, doc: str, params: list[Any]) -> Any:
    """``fn(**kwargs)`` as a typer command with ``params`` (its signature is built, not written)."""
    import inspect

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__signature__ = inspect.Signature(params, return_annotation=None)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def _tune_defaults(workload: Workload) -> Any:
    return workload.config_model.model_fields["tune"].default


def _registry_defaults(workload: Workload) -> Any:
    return workload.config_model.model_fields["registry"].default


def add_run_command(workload: Workload) -> None:
    """``tunepipe run <workload>``: the shared options, then the workload's own."""
    tune, registry = _tune_defaults(workload), _registry_defaults(workload)
    params = [
        _param("data", typer.Option(None, "--data", help=workload.data_help), str | None),
        _param("config", CONFIG, Path | None), _param("storage", STORAGE, str | None),
        *_workload_params(workload, "run"),
        _param("num_samples", _opt("--num-samples", tune.num_samples, "trials"), int | None),
        _param("search", _choice("--search", SEARCHERS, tune.search, SEARCH_HELP), str | None),
        _param("scheduler", _choice("--scheduler", SCHEDULERS, tune.scheduler, SCHEDULER_HELP), str | None),
        _param("max_iterations", _opt("--max-iterations", tune.max_iterations,
                                      "iterations per trial (boosting rounds, epochs)"), int | None),
        _param("max_concurrent", _opt("--max-concurrent", "as many as the CPUs allow", "trials at a time"),
               int | None),
        _param("workers_per_trial", _opt("--workers-per-trial", tune.resources.workers_per_trial,
                                         "Ray Train workers per trial and retrain (data-parallel)"), int | None),
        _param("seed", _opt("--seed", tune.seed), int | None),
        _param("model_name", _opt("--model-name", registry.model_name, "registered model"), str | None),
        _param("run_id", typer.Option(None, "--run-id", help="explicit experiment id (resume key)"), str | None),
        _param("force_promote", typer.Option(False, "--force-promote"), bool),
        _param("warm_start", typer.Option(False, "--warm-start", help="try the champion's config first"), bool),
        _param("summary_json", typer.Option(None, "--summary-json"), Path | None),
        _param("check", CHECK, bool), _param("wait_lease", WAIT_LEASE, float | None),
    ]

    def run(**kw: Any) -> None:
        _start_prefect_api_early(kw["check"])
        from flows.workloads import FLOWS

        _set_storage(kw["storage"])
        _set_lease_wait(kw["wait_lease"])
        cfg = _config(workload.config_model, kw["config"], {}, _overrides(workload.cli_options, **kw))
        workload.check_installed()  # an optional extra (torch): after the config is read, before any check
        _run(FLOWS[workload.name], cfg, kw["summary_json"], kw["check"])

    name = f"run_{workload.name.replace('-', '_')}"
    run_app.command(workload.name)(_guard(_command(run, name, f"Run the {workload.name} pipeline: {workload.title}.",
                                                   params)))


def add_prepare_command(workload: Workload) -> None:
    """``tunepipe prepare <workload>``: only the data stage; prints the version as JSON."""
    params = [_param("data", typer.Option(None, "--data", help=workload.data_help), str | None),
              _param("config", CONFIG, Path | None), _param("storage", STORAGE, str | None),
              *_workload_params(workload, "prepare")]

    def prepare(**kw: Any) -> None:
        from infra.settings import get_settings
        from tasks import workloads

        _quiet_env()
        _set_storage(kw["storage"])
        cfg = _config(workload.config_model, kw["config"], {}, _overrides(workload.cli_options, **kw))
        version = workloads.prepare(cfg, workloads.Context.build(get_settings()))
        typer.echo(json.dumps({"version": version.version, "uri": version.uri, "schema": version.schema_name,
                               "rows": version.rows, **workload.describe_version(version)}, indent=2, default=str))

    name = f"prepare_{workload.name.replace('-', '_')}"
    prepare_app.command(workload.name)(_guard(_command(
        prepare, name, f"Validate the {workload.name} data source and write a content-addressed data version.",
        params)))


for _workload in WORKLOADS.values():
    add_run_command(_workload)
    add_prepare_command(_workload)


@app.command("score")
@_guard
def score(data: str = typer.Option(..., "--data", help="file, glob, folder or s3:// prefix of rows to score, as "
                                                         "the model's workload reads them"),
          model_name: str = typer.Option(DEFAULT_MODEL_NAME, "--model-name"),
          alias: str = typer.Option("champion", "--alias"), storage: str | None = STORAGE) -> None:
    """Score rows with a registered model; predictions go under <storage>/predictions/."""
    from flows.batch_score import batch_score

    _quiet_env()
    _set_storage(storage)
    typer.echo(json.dumps(batch_score(data, model_name, alias), indent=2, default=str))


@stack_app.command("up")
@_guard
def stack_up(ray_head: bool = typer.Option(False, "--ray-head", help="also start a Ray head node")) -> None:
    """Start S3 (SeaweedFS), MLflow server, Prefect server + worker on 127.0.0.1 (idempotent)."""
    from infra import stack

    _print_stack(stack.up(ray_head=ray_head))
    typer.echo("point the pipeline at it:  eval \"$(tunepipe stack env --show-secrets)\"", err=True)


@stack_app.command("down")
@_guard
def stack_down() -> None:
    """Stop what `stack up` started (graceful, then forced)."""
    from infra import stack

    _print_stack(stack.down())


@stack_app.command("status")
@_guard
def stack_status() -> None:
    """Show each service, its URL and health."""
    from infra import stack

    _print_stack(stack.status())


@stack_app.command("env")
@_guard
def stack_env(show_secrets: bool = typer.Option(False, "--show-secrets")) -> None:
    """Print `export` lines that point the pipeline at the stack (secrets masked unless asked)."""
    from infra import stack

    typer.echo(stack.shell_exports(stack.env(show_secrets=show_secrets)))


def _print_stack(st: Any) -> None:
    typer.echo(str(st))


def main() -> None:
    from infra import prefect_api

    _quiet_env()  # before anything imports prefect/ray, which read their settings once
    prefect_api.start_early(sys.argv[1:])  # already done when started as the console script
    logging.basicConfig(level=os.environ.get("TUNEPIPE_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # `python -m flows.cli` ends like the `tunepipe` script (flows/console.py)
    from flows.console import main as console_main

    console_main()
