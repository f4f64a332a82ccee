"""Prefect flows and the CLI: orchestration only (which task runs when).

Importing this package sets two Prefect defaults this tool needs, unless the user set
them: a longer start-up timeout for the embedded (ephemeral) API server, which takes
18-21 s on a fresh database here, next to Prefect's default of 20 s; and no telemetry,
which only logs errors on a machine without internet.
"""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

__all__: list[str] = []
