"""The run logic without Prefect: the run directory and its typed state, the search's steps,
trial subprocesses, slots and GPUs, the population plan, the options and settings.

May import ``tuners`` and the ``autofinetune`` client; never ``prefect``, ``tasks``, ``watch``
or ``flows``. Everything here works in any process that sees the run directory.
"""

__all__: list[str] = []
