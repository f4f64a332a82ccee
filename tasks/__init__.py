"""Prefect tasks (thin @task wrappers, in ``tasks.steps``) and the plain I/O code they call:
trial subprocesses, GPU slots, the run directory. No search logic here."""

__all__: list[str] = []
