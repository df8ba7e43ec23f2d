"""The lesson opened as a notebook really runs: jupytext turns the file into an .ipynb, nbclient
executes it top to bottom in a fresh kernel on the tiny model (quick sizes), and every section's
demo cell produces its section's output. Importing the file still runs nothing (test_s0_setup)."""

import os

import pytest
from conftest import MODULE_PATH, ROOT

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nb = jupytext.read(MODULE_PATH)
    out = tmp_path_factory.mktemp("plots")
    env = {"LESSON_MODEL": "tiny", "LESSON_QUICK": "1", "LESSON_DEVICE": "cpu", "LESSON_PLOT_DIR": str(out),
           "LESSON_FILE": str(MODULE_PATH)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(ROOT)}})
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb, out


def _outputs(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def test_notebook_runs_every_section_demo_where_the_section_ends(executed):
    nb, plots = executed
    demo_cells = [c for c in nb.cells if c.cell_type == "code" and c.source.startswith("notebook_demo(")]
    assert len(demo_cells) >= 8
    for cell in demo_cells:
        errors = [o for o in cell.outputs if o.get("output_type") == "error"]
        assert not errors, errors
        text = _outputs(cell)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        dashes = [i for i, ln in enumerate(lines) if set(ln) == {"-"}]  # under the demo's title
        assert dashes and len(lines) > dashes[0] + 1, f"{cell.source!r} printed {text[:300]!r}"
    kv = next(c for c in demo_cells if '"kv_cache"' in c.source)
    assert "KV cache" in _outputs(kv)
    assert list(plots.glob("*.png")), "the notebook's demos saved no plot"


def test_no_cell_failed_and_main_did_not_run(executed):
    nb, _ = executed
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    last = nb.cells[-1]  # the `if __name__ == "__main__"` cell: a kernel is not the command line
    assert "__main__" in last.source and not _outputs(last)
