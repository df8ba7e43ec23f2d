"""The lesson opened as a notebook really runs: jupytext turns the file into an .ipynb, nbclient
executes it top to bottom in a fresh kernel on the tiny model (quick sizes), and every section's
demo cell produces its section's output, figures inline, tables as HTML; with $LESSON_PLOTS=0, no
figure. Importing the file still runs nothing (test_s0_setup)."""

import os

import pytest
from conftest import MODULE_PATH, ROOT

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


# The demos that draw figures in a quick run of the tiny model (§8's decode-speed figure needs
# decode timings, which only a full run makes).
PLOTTING_DEMOS = ("roofline", "memory", "kv_cache", "paged_attention", "continuous_batching", "speculative",
                  "flash_decoding", "quantization", "gguf_formats", "fast_path")


def execute(tmp_path_factory, plots: bool = True):
    nb = jupytext.read(MODULE_PATH)
    out = tmp_path_factory.mktemp("plots")
    env = {"LESSON_MODEL": "tiny", "LESSON_QUICK": "1", "LESSON_DEVICE": "cpu", "LESSON_PLOT_DIR": str(out),
           "LESSON_FILE": str(MODULE_PATH), "LESSON_PLOTS": "1" if plots else "0"}
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


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    return execute(tmp_path_factory)


def _outputs(cell) -> str:
    """A cell's printed text and the text of the HTML tables it displayed."""
    return "".join(o.get("text", "") if o.get("output_type") == "stream"
                   else o.get("data", {}).get("text/html", "") for o in cell.get("outputs", []))


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", [])
               if o.get("output_type") == "display_data")


def _demo_cells(nb) -> dict:
    return {c.source.split('"')[1]: c for c in nb.cells
            if c.cell_type == "code" and c.source.startswith("notebook_demo(")}


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


def test_figures_show_inline_and_tables_as_html(executed):
    nb, plots = executed
    demos = _demo_cells(nb)
    counts = {name: _images(cell) for name, cell in demos.items()}
    assert all(counts[name] >= 1 for name in PLOTTING_DEMOS), counts
    assert sum(counts.values()) >= 10, counts
    assert len(list(plots.glob("*.png"))) >= 10  # shown and saved
    memory = "".join(o.get("data", {}).get("text/html", "") for o in demos["memory"].outputs)
    assert "<table>" in memory and "llama-3-8b" in memory  # the 13-column table, as HTML
    first = next(iter(demos.values()))  # the first demo cell says what it took from the file
    assert "(defined from 01_llm_inference_optimization.py" in _outputs(first)


def test_no_figure_when_plots_are_off(tmp_path_factory):
    nb, plots = execute(tmp_path_factory, plots=False)
    assert not [c for c in nb.cells if c.cell_type == "code" and _images(c)]
    assert not list(plots.glob("*.png"))
    errors = [o for c in nb.cells if c.cell_type == "code"
              for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
