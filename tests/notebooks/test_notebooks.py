"""The notebooks in ``notebooks/`` run top to bottom, and are committed without outputs.

Every ``notebooks/*.ipynb`` is picked up at collection time, so a new notebook is tested without
touching this file. Each one is executed by nbclient in a fresh kernel that runs *this*
interpreter (``sys.executable``): the kernel spec is written to a temporary directory and looked
up there alone, so neither a user-level ``python3`` kernel spec (which may point at another Python
without hdiff) nor a missing one in a fresh ``.venv`` can change which Python runs the notebook.
The kernel runs offline (``HF_HUB_OFFLINE=1``), draws to files only (``MPLBACKEND=Agg``, unless
the notebook asks for inline figures) and starts in ``notebooks/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "hdiff-notebook-test"
CELL_TIMEOUT_S = 300  # per cell; the quickstart runs in ~25 s in total on a 2-core CPU
KERNEL_ENV = {"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "PYDEVD_DISABLE_FILE_VALIDATION": "1"}


def _ids(paths: list[Path]) -> list[str]:
    return [p.name for p in paths]


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding one kernel spec, :data:`KERNEL_NAME`, that launches ``sys.executable``."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": "hdiff tests", "env": KERNEL_ENV})
    return kernels


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from nbclient import NotebookClient

    for key, value in KERNEL_ENV.items():  # also in the spec; here for anything the kernel spawns
        monkeypatch.setenv(key, value)
    spec = KernelSpecManager(kernel_dirs=[str(kernel_dir)]).get_kernel_spec(KERNEL_NAME)
    assert Path(spec.argv[0]).resolve() == Path(sys.executable).resolve(), spec.argv
    km = AsyncKernelManager(kernel_name=KERNEL_NAME,
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError (with the traceback) if any cell fails


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; "
                       "clear all outputs before committing (Jupyter: Edit > Clear Outputs of All Cells)")


def test_notebooks_exist() -> None:
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
