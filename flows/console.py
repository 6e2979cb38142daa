"""The ``tunepipe`` console script.

Its first step: before the CLI (and Prefect, Ray, MLflow) is imported, a ``tunepipe run`` starts
Prefect's local API server, so that its start-up overlaps those imports (infra/prefect_api.py says
why and how).

Its last step: once the command is done, its non-daemon threads joined and every ``atexit``
handler run (Prefect's, Ray's, MLflow's, logging's flush, temporary folders' clean-up), the process
ends with ``os._exit`` instead of tearing down the interpreter. That teardown frees the objects of
every module one by one: ~1-2 s here after a run, for nothing a user can see (``TUNEPIPE_FULL_EXIT=1``
keeps it, e.g. to run leak checkers).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys

_EXIT: dict[str, int] = {}


def _exit_now() -> None:
    """Registered first, so run last of the ``atexit`` handlers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(_EXIT.get("code", 1))


def main() -> None:
    # A native crash (a C extension, a thread torn down at exit) prints every thread's Python stack
    # instead of dying silently with -11: seen once at the very end of a finished run.
    faulthandler.enable()
    if os.environ.get("TUNEPIPE_FULL_EXIT") != "1":
        atexit.register(_exit_now)
    from infra import prefect_api
    from infra.process_env import apply_quiet_env

    apply_quiet_env()  # the server started next inherits it
    prefect_api.start_early(sys.argv[1:])
    from flows.cli import main as cli_main

    try:
        cli_main()
        _EXIT["code"] = 0
    except SystemExit as done:
        code = done.code
        _EXIT["code"] = code if isinstance(code, int) else (0 if code is None else 1)
        raise


if __name__ == "__main__":
    main()
