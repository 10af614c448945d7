"""Hugging Face's ``kernels`` package against our ``kernels/`` directory.

transformers (5.25 and newer, 2026-12) runs ``from kernels import ...`` at import where a package named
``kernels`` (Hugging Face's kernel hub) is installed. fusedact installs its Triton layer as
``fusedact.kernels``, never as a top-level ``kernels``; but a process started in a source checkout
(``python -m pytest``, ``python -m bench.e2e``, ``python -m fusedact``) has the checkout's root first on
sys.path, and there our ``kernels/`` directory shadows the installed package: transformers' import fails.
``import_installed_kernels`` imports the installed one first, from sys.path without the entries that hold
ours, so that later imports of ``kernels`` find it in ``sys.modules``. Nothing happens where no such
package is installed, or where nothing shadows it.
"""

import importlib.metadata
import sys
from pathlib import Path

_OURS = (Path(__file__).resolve().parent.parent / "kernels").resolve()  # (a source checkout's kernels/, if any)


def _holds_ours(entry: str) -> bool:
    try:
        return (Path(entry or ".").resolve() / "kernels") == _OURS
    except OSError:
        return False


def import_installed_kernels() -> None:
    if "kernels" in sys.modules or not any(_holds_ours(entry) for entry in sys.path):
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    saved = sys.path[:]
    sys.path[:] = [entry for entry in sys.path if not _holds_ours(entry)]
    try:
        import kernels  # noqa: F401
    except Exception:  # (broken: transformers then finds no kernel hub either way)
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved
