"""The example notebooks: committed without outputs, and they execute on tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the notebooks extra: lagnet[notebooks]")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "examples" / "notebooks"
NOTEBOOKS = ["quickstart.ipynb", "plug_into_your_model.ipynb"]
KERNEL = "python3"


def test_the_notebooks_are_there() -> None:
    found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_has_no_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"code cell {i} of {name} has outputs"
        assert cell.get("execution_count") is None, f"code cell {i} of {name} has a count"
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL


def ensure_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the ``python3`` kernel findable, installing a spec in a temp dir if needed."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
        return
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter-prefix"
    install(prefix=str(prefix), kernel_name=KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    KernelSpecManager().get_kernel_spec(KERNEL)  # raises if it is still missing


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    ensure_kernel(tmp_path, monkeypatch)
    # the kernel inherits the environment: scratch files go to tmp_path, and one intra-op
    # thread keeps the tiny models fast on a shared CI machine
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=KERNEL,
        timeout=180,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if name == "quickstart.ipynb":
        assert len(images) == 3  # ranked list, attention maps, dropped region
        assert "(36, 3584)" in text and "mAP" in text
    else:
        assert len(images) == 2  # attention maps, dropped region
        assert "eval mode returns its input: True" in text
        assert "the strong region is dropped: True" in text
        assert "12 steps" in text
