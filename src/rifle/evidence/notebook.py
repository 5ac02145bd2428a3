"""For notebooks/: finding the stores from the folder Jupyter opens them in (`nearest`, rifle.track.store's), and
running them headless with parameters (docs/how-to/notebooks.md; the tests run them so they never rot)."""
from __future__ import annotations

from pathlib import Path

from ..track.store import nearest  # noqa: F401  (one rule for the report, the sweep's storage and the notebooks)


def execute_notebook(path: str | Path, parameters: dict | None = None, output_path: str | Path | None = None,
                     timeout: int = 600, cwd: str | Path | None = None):
    """Run a notebook in `cwd` (default: here) with `parameters` injected after its cell tagged "parameters"
    (papermill's convention); written to `output_path` when given, and returned. Needs the `notebooks` extra."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(str(path), as_version=4)
    if parameters:
        where = next((i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), None)
        if where is None:
            raise ValueError(f"{path}: no cell tagged 'parameters' to inject {sorted(parameters)} after")
        source = "# Injected parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
        nb.cells.insert(where + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(cwd or Path.cwd())}}).execute()
    if output_path:
        nbformat.write(nb, str(output_path))
    return nb
