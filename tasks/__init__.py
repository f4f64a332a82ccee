"""Only the Prefect ``@task`` functions, thin: plain data in, one call into ``runtime``, a record out.

May import ``prefect``, ``runtime`` and ``tuners``; never ``flows`` or ``watch``, and no
module globals: a task must work in another process or on another host.
"""

__all__: list[str] = []
