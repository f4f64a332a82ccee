"""Observers of a search (progress display, VisualDL logs, the GPU list at start), told of
events by the flow in its own process; never needed for correctness.

May import ``runtime`` (for the run dir's layout and ranking) and ``tuners``; never
``prefect``, ``tasks`` or ``flows``.
"""

__all__: list[str] = []
