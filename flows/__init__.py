"""Prefect flows, the CLI and Prefect plumbing: orchestration only (which task runs when, on
which task runner), the embedded API server, automations and artifacts.

May import everything below it: ``tasks``, ``runtime``, ``watch``, ``tuners``. Importing it
changes nothing in the process (the CLI sets Prefect's defaults in ``flows.cli.main``).
"""

__all__: list[str] = []
