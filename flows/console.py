"""The ``tunepipe`` console script's first step: before the CLI (and Prefect, Ray, MLflow) is
imported, a ``tunepipe run`` starts Prefect's local API server, so that its start-up overlaps those
imports (infra/prefect_api.py says why and how)."""

from __future__ import annotations

import sys


def main() -> None:
    from infra import prefect_api
    from infra.process_env import apply_quiet_env

    apply_quiet_env()  # the server started next inherits it
    prefect_api.start_early(sys.argv[1:])
    from flows.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
