"""The example notebooks run top to bottom (nbclient) without an error and with nothing on stderr.

The kernel is this interpreter (a kernelspec written to a temp dir that points at ``sys.executable``),
so the notebooks see the same venv and the installed ``matcalc``. ``04_remote_server`` runs against a
real ``matcalc serve`` that the test starts on loopback (URL and API key passed in the kernel's env).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EXECUTED = ["01_quickstart", "02_screening_on_a_cluster", "03_heat_capacity_and_stability", "04_remote_server"]
REMOTE = "04_remote_server"
API_KEY = "notebook-test-key-1"
THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def remote_server(tmp_path_factory):
    """`matcalc serve` on a free loopback port with a temp SQLite DB and an API key (for notebook 04)."""
    pytest.importorskip("httpx")
    from live_server import LiveServer

    work = tmp_path_factory.mktemp("serve")
    srv = LiveServer(work, f"sqlite:///{work / 'nb.db'}", "--workers", "2", api_key=API_KEY, env=THREAD_ENV)
    srv.start(timeout_s=120)
    try:
        yield srv.url
    finally:
        srv.stop()


def write_kernelspec(root: Path, env: dict[str, str]) -> Path:
    spec = root / "matcalc-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "matcalc test", "language": "python", "env": env,
    }))
    return root


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory) -> Path:
    """A kernelspec for this very interpreter, independent of any system-wide ``python3`` spec.

    One BLAS/torch thread: spin-waiting thread pools collapse on a shared, oversubscribed CPU
    (measured 20x slower CHGNet calls here; see docs/troubleshooting.md).
    """
    return write_kernelspec(tmp_path_factory.mktemp("kernels"), dict(THREAD_ENV))


def run_notebook(path: Path, kernel_dir: Path, cwd: Path) -> nbformat.NotebookNode:
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=4)
    ksm = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    km = KernelManager(kernel_name="matcalc-test", kernel_spec_manager=ksm)
    client = nbclient.NotebookClient(nb, km=km, timeout=300, allow_errors=False,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return nb


def test_committed_without_outputs():
    books = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    assert books == sorted(EXECUTED)
    for name in books:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, name


@pytest.mark.slow
@pytest.mark.parametrize("name", EXECUTED)
def test_notebook_runs(name, kernel_dir, tmp_path, request):
    if name == REMOTE:  # its own kernelspec, pointing the notebook at a live server
        url = request.getfixturevalue("remote_server")
        kernel_dir = write_kernelspec(tmp_path / "kernels-remote",
                                      {**THREAD_ENV, "MATCALC_URL": url, "MATCALC_API_KEY": API_KEY})
    t0 = time.monotonic()
    try:
        nb = run_notebook(NOTEBOOKS / f"{name}.ipynb", kernel_dir, tmp_path)
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{name} failed:\n{exc}")
    elapsed = time.monotonic() - t0
    print(f"{name}: {elapsed:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    # nothing on stderr (red boxes in Jupyter): no third-party warning, traceback or log line reaches the user;
    # every cell of these notebooks prints on purpose to stdout only
    stderr = [(i, o.text) for i, c in enumerate(nb.cells) if c.cell_type == "code"
              for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not stderr, "\n".join(f"cell {i}: {t}" for i, t in stderr)
    # every figure a cell returns is rendered as a PNG (plot() gives Figures with content)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} shows no plot"
    if name == "02_screening_on_a_cluster":  # the live widgets were displayed as widget views
        views = [o for c in code for o in c.outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert len(views) >= 3
        # each keeps a static copy of its final state (what a saved notebook, nbconvert or a viewer without the
        # widget manager shows): every task finished, the failed one in the table under its label
        snapshots = [o["data"].get("text/html", "") for o in views]
        assert all(snapshots)
        assert any("7/7</b> tasks finished" in h and "1 failed" in h for h in snapshots)
        assert any("7/7 finished (6 completed, 1 failed)" in h and "Fe (not in EMT)" in h for h in snapshots)
        assert not any("running" in h for h in snapshots)
    if name == "01_quickstart":  # a single call shows its progress under the cell, final step included
        relax_cell = next(c for c in code if "mc.relax(" in c.source)
        lines = [o["data"]["text/plain"] for o in relax_cell.outputs if "text/html" in o.get("data", {})
                 and "matcalc-call-progress" in o["data"]["text/html"]]
        steps = next(o.text for o in relax_cell.outputs if o.output_type == "stream" and "converged" in o.text)
        n = steps.split("after ")[1].split(" steps")[0]
        assert lines and f"relax {n}/" in lines[0], (lines, steps)
