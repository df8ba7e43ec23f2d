"""The figures: where they go, how a notebook shows them, and that each new figure draws exactly
the rows its section measured (tiny model, small sizes). Also: `notebook_demo` runs the
notebook's own definitions, so an edited cell takes effect."""

import math
import sys
import types

import numpy as np
import pytest
from conftest import MODULE_PATH


@pytest.fixture
def plot_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    return tmp_path


def points(ax, marker: str | None = None) -> list[tuple[float, float]]:
    """The (x, y) points an axes draws with `marker`: line markers and scatter offsets."""
    out = []
    for line in ax.lines:
        if marker is None or line.get_marker() == marker:
            out += [tuple(p) for p in line.get_xydata()]
    if marker is None:
        for coll in ax.collections:
            out += [tuple(p) for p in coll.get_offsets()]
    return out


def close(a, b) -> bool:
    """The same points, in any order."""
    a, b = sorted(map(tuple, a)), sorted(map(tuple, b))
    return len(a) == len(b) and all(np.allclose(p, q, equal_nan=True) for p, q in zip(a, b))


# ---------------------------------------------------------------------------------------------
# where figures go, and how a kernel shows figures and tables
# ---------------------------------------------------------------------------------------------
def test_plot_files_are_named_after_the_model(llm, monkeypatch):
    monkeypatch.delenv("LESSON_PLOT_DIR", raising=False)
    assert llm.plot_folder("tiny") == llm.OUTPUT_DIR / "tiny"
    assert llm.plot_folder("smollm2") == llm.OUTPUT_DIR / "smollm2-135m"
    assert llm.plot_folder(llm.ModelConfig.from_name("llama-3-8b")) == llm.OUTPUT_DIR / "llama-3-8b"
    assert llm.plot_folder("/x/My-Model.Q8_0.gguf") == llm.OUTPUT_DIR / "my-model.q8_0"
    monkeypatch.setenv("LESSON_PLOT_DIR", "/somewhere/assets")  # --save-assets: the flat gallery
    assert str(llm.plot_folder("tiny")) == "/somewhere/assets"


def test_rows_render_as_html_in_a_kernel_and_text_in_a_terminal(llm, monkeypatch, capsys):
    rows = llm.Rows([{"name": "<b>", "time (ms)": 1.5}], "A & B")
    html = rows._repr_html_()
    assert "<table>" in html and "A &amp; B" in html and "&lt;b&gt;" in html and "1.50" in html
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    assert not llm.in_jupyter_kernel()  # pytest is no kernel: plain text
    llm.print_table(rows)
    assert "| name" in capsys.readouterr().out and not shown
    monkeypatch.setattr(llm, "in_jupyter_kernel", lambda: True)
    text = llm.print_table(rows)
    assert capsys.readouterr().out == "" and "A & B" in text
    assert len(shown) == 1 and "<table>" in shown[0].data


def test_show_plot_displays_inline_in_a_kernel_and_prints_the_caption(llm, plot_dir, monkeypatch, capsys):
    fig, ax = llm.new_figure()
    ax.plot([0, 1], [1, 0])
    plot = llm.save_plot(fig, "check", "the line falls", model="tiny")
    llm.show_plot(plot)
    out = capsys.readouterr().out
    assert "check.png" in out and "the line falls" in out
    shown = []
    monkeypatch.setattr("IPython.display.display", shown.append)
    monkeypatch.setattr(llm, "in_jupyter_kernel", lambda: True)
    llm.show_plot(plot)
    assert shown == [plot] and plot._repr_png_()[:4] == b"\x89PNG"
    assert "Figure: the line falls" in capsys.readouterr().out


def test_run_demo_reads_plots_off_from_the_environment(llm, monkeypatch, capsys):
    seen = {}

    def demo(plots, **_):
        seen["plots"] = plots
    monkeypatch.setattr(llm, "demo_sections", lambda: {"x": ("X", demo)})
    monkeypatch.setenv("LESSON_PLOTS", "0")
    llm.run_demo("x")
    assert seen == {"plots": False}


# ---------------------------------------------------------------------------------------------
# notebook_demo runs the notebook's own definitions
# ---------------------------------------------------------------------------------------------
def test_notebook_demo_runs_the_notebooks_edited_definitions(monkeypatch, capsys):
    """A notebook namespace built from the file's cells up to §3's memory demo; a cell then
    redefines the demo. notebook_demo must run the edited one, define what the notebook has not
    reached (run_demo, ...) inside the notebook's namespace, and say so in one line."""
    jupytext = pytest.importorskip("jupytext")
    monkeypatch.setenv("LESSON_FILE", str(MODULE_PATH))
    module = types.ModuleType("lesson_notebook")  # dataclasses look their module up in sys.modules
    monkeypatch.setitem(sys.modules, "lesson_notebook", module)
    ns = module.__dict__
    for cell in jupytext.read(MODULE_PATH).cells:
        if cell.cell_type != "code":
            continue
        if cell.source.startswith('notebook_demo("memory")'):
            break
        if not cell.source.startswith("notebook_demo("):
            exec(compile(cell.source, str(MODULE_PATH), "exec"), ns)
    assert "run_demo" not in ns and "read_gguf" not in ns  # appendices: not reached yet
    ns["running_as_notebook"] = lambda: True  # what a Jupyter kernel makes it say
    exec("def demonstrate_memory_requirements(**options):\n    print('edited in the notebook')\n", ns)
    ns["notebook_demo"]("memory")
    out = capsys.readouterr().out
    assert "edited in the notebook" in out
    first = out.splitlines()[0]
    assert first.startswith("(defined from 01_llm_inference_optimization.py") and "names" in first
    assert ns["run_demo"].__globals__ is ns and ns["Rows"].__module__ == "lesson_notebook"
    assert "edited in the notebook" in ns["demonstrate_memory_requirements"].__code__.co_consts  # kept
    ns["notebook_demo"]("memory")  # everything is defined now: no second note
    assert capsys.readouterr().out.splitlines()[0] != first


# ---------------------------------------------------------------------------------------------
# each figure draws its section's rows (tiny model, small sizes)
# ---------------------------------------------------------------------------------------------
def test_decode_batch_plot_draws_the_measured_sweep(llm, plot_dir):
    rows = llm.measure_prefill_vs_decode("tiny", "cpu", quick=True, peak_flops=2e10, bandwidth=1e10,
                                         prompt_lens=(16,), batch_sizes=(1, 2, 4), decode_contexts=(300,),
                                         context_len=64, context_batch=2)
    plot = llm.plot_decode_batch(rows, "tiny", 2e10, 1e10, 4, model="tiny")
    sweep = [(r["batch"], r["time (ms)"]) for r in rows if r["phase"] == "decode" and r["context"] == 65]
    assert close(points(plot.figure.axes[0], "^"), sweep)
    assert plot.path == plot_dir / "s2_decode_step_vs_batch.png" and "B=1" in plot.caption
    roof = llm.plot_roofline(rows, 2e10, 1e10, model="tiny")
    texts = [t.get_text() for t in roof.figure.axes[0].texts]
    assert {"B=1", "B=2", "B=4", "T=16"} <= set(texts)
    assert any("H100" in t.get_text() for t in roof.figure.axes[0].get_legend().get_texts())


def test_sequences_that_fit_plot_draws_its_rows(llm, plot_dir):
    rows = llm.analyze_sequences_that_fit(contexts=(1024, 4096, 8192))
    assert {r["model"] for r in rows} == {"llama-2-7b", "llama-3-8b", "llama-3-8b as MHA"}
    assert not any(r["model"] == "llama-2-7b" and r["context (tokens)"] == 8192 for r in rows)  # past 4k
    gqa = {r["context (tokens)"]: r["sequences that fit"] for r in rows if r["model"] == "llama-3-8b"}
    mha = {r["context (tokens)"]: r["sequences that fit"] for r in rows if r["model"] == "llama-3-8b as MHA"}
    assert all(gqa[t] > 3 * mha[t] for t in gqa)  # 4× fewer KV heads; the weights are a fixed cost
    plot = llm.plot_sequences_that_fit(rows, "tiny")
    lines = plot.figure.axes[0].lines
    for line, name in zip(lines, ["llama-2-7b", "llama-3-8b", "llama-3-8b as MHA"]):
        assert close(line.get_xydata(), [(r["context (tokens)"], r["sequences that fit"]) for r in rows
                                         if r["model"] == name])


def test_kv_cache_plot_draws_the_steps_and_the_totals(llm, plot_dir):
    rows = llm.measure_kv_cache("tiny", new_tokens=(8, 24), device="cpu", checked_tokens=4,
                                num_positions=3)
    steps = rows.steps
    plot = llm.plot_kv_cache(steps, "KV cache, tiny", rows, "tiny")
    per_step, cumulative = plot.figure.axes
    xs = [r["context (tokens)"] for r in steps]
    assert close(points(per_step), [(x, r["no cache (ms)"]) for x, r in zip(xs, steps)]
                 + [(x, r["KV cache (ms)"]) for x, r in zip(xs, steps)])
    summed = [r for r in rows if r["how"].startswith("sum")]
    dots = points(cumulative, "o")
    assert close(dots, [(r["new tokens"], r["no cache (s)"]) for r in summed]
                 + [(r["new tokens"], r["KV cache (s)"]) for r in summed])
    assert close(points(cumulative, "x"), [(rows[0]["new tokens"], rows[0]["no cache (s)"]),
                                           (rows[0]["new tokens"], rows[0]["KV cache (s)"])])


def test_batching_timeline_shares_a_time_axis_and_shades_padding(llm, plot_dir):
    rows = llm.measure_continuous_batching("tiny", "cpu", num_requests=5, mean_output=6,
                                           max_num_seqs=2, preemption_modes=())
    timelines = rows.timelines
    wall = {"static": rows[0]["wall (s)"], "continuous": rows[1]["wall (s)"]}
    plot = llm.plot_batching_timeline(timelines, 2, "tiny", wall, "tiny")
    static, cont = plot.figure.axes
    assert static.get_xlim() == cont.get_xlim() and "time (s" in cont.get_xlabel()
    right = max(c.get_paths()[0].vertices[:, 0].max() for c in static.collections)
    assert right == pytest.approx(wall["static"])  # the last static step ends at the measured wall time
    assert any(c.get_hatch() for c in static.collections)  # padding: a finished request's held slot
    lanes = llm._slot_lanes(timelines["continuous"], 2, static=False)
    assert len(lanes) == 5 and {slot for _, slot, _, _ in lanes} == {0, 1}


def test_speculative_plots_draw_the_measured_rows(llm, plot_dir):
    rows = llm.measure_speculative_decoding("tiny", "cpu", gammas=(2, 3), model_draft_gammas=(1,),
                                            max_new_tokens=8)
    plot = llm.plot_speedup_vs_gamma(rows, "tiny", model="tiny")
    drafts = list(dict.fromkeys(r["draft"] for r in rows))
    for ax, draft in zip(plot.figure.axes, drafts):
        measured = [tuple(p) for c in ax.collections for p in c.get_offsets()]
        assert close(measured, [(r["γ"], r["measured (×)"]) for r in rows if r["draft"] == draft])
        assert ax.get_legend() is not None
    ax = llm.plot_speculative(rows, "tiny", "tiny").figure.axes[0]
    assert close([tuple(p) for c in ax.collections for p in c.get_offsets()],
                 [(r["predicted (×)"], r["measured (×)"]) for r in rows])
    labels = [t.get_text() for t in ax.texts]
    assert sorted(t for t in labels if t.startswith("γ=")) == sorted(f"γ={r['γ']}" for r in rows)
    assert any("plain decoding" in t for t in labels)  # the y = 1 line is labelled


def test_flash_decoding_plot_draws_the_copy_bandwidth_floor(llm, plot_dir):
    rows = llm.measure_flash_decoding("cpu", contexts=(256, 1024), heads=4, kv_heads=2, head_dim=16, repeat=1)
    plot = llm.plot_flash_decoding(rows, "tiny attention on CPU", "tiny")
    floor = next(line for line in plot.figure.axes[0].lines if line.get_linestyle() == "--")
    by_ctx = {r["context"]: r["time (µs)"] * r["% of copy bandwidth"] / 100 for r in rows}
    assert close(floor.get_xydata(), list(by_ctx.items()))
    assert "copy bandwidth" in floor.get_label()


def test_quantization_plots_draw_the_measured_rows(llm, plot_dir):
    rows = llm.measure_quantization("tiny", "cpu", quick=True, show_progress=False)
    gguf = [{"scheme": "fp32 (file)", "bits/weight": 32.0, "perplexity vs fp32 %": 0.0},
            {"scheme": "Q4_0", "bits/weight": 4.9, "perplexity vs fp32 %": 3.0}]
    plot = llm.plot_perplexity_vs_bits(rows, "tiny", gguf, "tiny")
    drawn = [tuple(p) for line in plot.figure.axes[0].lines if line.get_marker() in ("o", "s", "^", "D")
             for p in line.get_xydata()]
    assert rows[0]["scheme"].startswith("fp32")  # fp32 is the zero line, not a point
    assert close(drawn, [(r["bits/weight"], r["perplexity vs fp32 %"]) for r in rows[1:]] + [(4.9, 3.0)])
    timed = [{**r, "decode (tok/s)": 100.0 / r["bits/weight"]} for r in rows]  # one speed per format
    speed = llm.plot_decode_vs_bandwidth(timed, 1e9, "tiny", "tiny")
    assert close(points(speed.figure.axes[0], "o"), [(r["bits/weight"], r["decode (tok/s)"]) for r in timed])
    with pytest.raises(llm.InvalidArgumentError):
        llm.plot_decode_vs_bandwidth(rows, 1e9, "tiny")  # quick rows hold no decode speed


def test_step_time_plot_splits_the_measured_step(llm, plot_dir):
    overhead = llm.measure_launch_overhead("tiny", "cpu")
    modes = llm.measure_fast_path("tiny", "cpu", new_tokens=4, compile_step=False)
    plot = llm.plot_step_time(modes, overhead, "tiny", "tiny")
    bars = plot.figure.axes[0].patches
    n = len(modes)
    totals = [bars[i].get_width() + bars[n + i].get_width() for i in range(n)]
    assert np.allclose(totals, [1e3 / r["tokens/s"] for r in modes])
    assert all(math.isclose(bars[i].get_width(), min(1e3 / r["bandwidth limit (tok/s)"], t))
               for i, (r, t) in enumerate(zip(modes, totals)))
    assert f"{overhead[0]['ops per step']} operations" in plot.caption


def test_block_layouts_name_every_field_and_have_a_legend(llm, plot_dir):
    plot = llm.plot_block_layouts(model="tiny")
    ax = plot.figure.axes[0]
    texts = [t.get_text() for t in ax.texts]
    for t, fields in llm.GGUF_BLOCK_FIELDS.items():
        for name, nbytes in fields:
            assert f"{name} {nbytes}" in texts, (t, name)
    assert len(ax.get_legend().get_texts()) == 5
