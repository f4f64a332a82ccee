"""``import tuners`` stays light: no scipy, no cmaes until a HAZero is made, no Optuna until a TPE models.

cmaes's package imports scipy (about a second, and hundreds of modules) for one optimizer we
do not use; every Prefect task that only reads a search space imports ``tuners``. Each check runs
in a fresh interpreter, since this test process has long imported both.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after ``code`` runs in a fresh interpreter."""
    script = code + "\nimport sys\nprint(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_import_tuners_loads_neither_scipy_nor_cmaes_nor_optuna():
    modules = _modules_after("import tuners\nfrom tuners import SearchSpace, make_tuner, HAZero, PSHE2, TPE")
    assert "tuners" in modules and "numpy" in modules
    assert "scipy" not in modules
    assert "cmaes" not in modules
    assert "optuna" not in modules


def test_a_pshe2_search_loads_no_cmaes():
    modules = _modules_after(
        "from tuners import SearchSpace, make_tuner\n"
        "space = SearchSpace.from_dict({'param_list': [{'name': 'x', 'type': 'float', 'init_value': 0.5,"
        " 'greater_than': 0.0, 'lower_than': 1.0}]})\n"
        "tuner = make_tuner('pshe2', space, popsize=3, seed=0)\n"
        "tuner.tell([0.0] * len(tuner.ask()))\n"
        "tuner.load_state_dict(tuner.state_dict())")
    assert "cmaes" not in modules and "scipy" not in modules


def test_making_a_hazero_loads_cmaes():
    # the lazy import happens where it should: the first HAZero brings cmaes in
    modules = _modules_after(
        "from tuners import SearchSpace, make_tuner\n"
        "space = SearchSpace.from_dict({'param_list': [{'name': 'x', 'type': 'float', 'init_value': 0.5,"
        " 'greater_than': 0.0, 'lower_than': 1.0}]})\n"
        "tuner = make_tuner('hazero', space, popsize=4, seed=0)\n"
        "tuner.tell([0.0] * len(tuner.ask()))")
    assert "cmaes" in modules
