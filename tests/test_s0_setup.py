"""§0 Setup: device choice, timer, tables, plots; nothing runs at import."""

import subprocess
import sys

import pytest
import torch
from conftest import MODULE_PATH


def test_import_prints_nothing_and_runs_nothing():
    code = (f"import importlib.util as u; s = u.spec_from_file_location('m', r'{MODULE_PATH}'); "
            "m = u.module_from_spec(s); s.loader.exec_module(m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""


def test_import_without_pytorch_names_the_requirements():
    """Where PyTorch is missing, importing the file fails at once with an ImportError that says
    what to install."""
    code = ("import sys; sys.modules['torch'] = None; "  # `import torch` now raises ImportError
            f"import importlib.util as u; s = u.spec_from_file_location('m', r'{MODULE_PATH}'); "
            "m = u.module_from_spec(s); s.loader.exec_module(m)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().endswith(
        "ImportError: this lesson needs NumPy, PyTorch and its other requirements: "
        "pip install -r requirements.txt"), out.stderr


def test_pick_device(llm):
    assert llm.pick_device("cpu") == torch.device("cpu")
    assert llm.pick_device(None).type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(llm.LessonError, match="--device cpu"):
            llm.pick_device("cuda")


def test_unknown_device_and_demo_names_get_named_errors(llm):
    with pytest.raises(llm.InvalidArgumentError, match="'gpu'; use 'cpu', 'cuda', 'cuda:N'.*'mps'"):
        llm.pick_device("gpu")
    with pytest.raises(llm.InvalidArgumentError, match="'gpu'"):
        llm.Timer("gpu").__enter__()  # the timer resolves its device the same way
    with pytest.raises(llm.InvalidArgumentError, match="no demo named 'nope'.*continuous_batching"):
        llm.run_demo("nope")


def test_timer_and_benchmark(llm):
    with llm.Timer("cpu") as t:
        sum(range(10000))
    assert 0 < t.seconds < 5
    calls = []
    med = llm.benchmark(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and 0 < med < 1  # median of 3 runs of an append: positive, tiny


def test_print_table(llm, capsys):
    text = llm.print_table([{"a (ms)": 1.5, "b": "x"}, {"a (ms)": 2.25, "b": "y"}], "Title")
    assert "Title" in text and "a (ms)" in text and "2.25" in text
    assert capsys.readouterr().out.strip() == text.strip()


def test_save_plot(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    fig, ax = llm.new_figure()
    ax.plot([0, 1], [1, 0])
    plot = llm.save_plot(fig, "check", "what to notice")
    assert plot.path == tmp_path / "check.png" and plot.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.caption == "what to notice" and plot._repr_png_() == plot.path.read_bytes()


def test_cli_list_and_unknown_section(llm, capsys):
    assert llm.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "paged_attention" in out and "summary" in out
    assert "not yet written" not in out  # every section has its demo now
    with pytest.raises(SystemExit):
        llm.main(["--section", "no_such_section"])


def test_cli_runs_demos_on_tiny(llm, capsys):
    assert llm.main(["--section", "memory", "--section", "kv_cache", "--model", "tiny", "--quick",
                     "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "KV cache vs recomputation" in out and "llama-3-8b" in out


def test_docstring_examples(llm):
    """The worked examples in the module's docstrings run and give what they show."""
    import doctest

    result = doctest.testmod(llm, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 10 and result.failed == 0


def test_demos_run_offline_on_tiny(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    row = llm.demonstrate_generation(model="tiny", max_new_tokens=5, device="cpu")["generation"][0]
    assert row["new tokens"] <= 5 and row["prompt tokens"] > 0
    ppl = llm.demonstrate_perplexity(model="tiny", device="cpu", quick=True)["perplexity"]
    assert ppl[0]["perplexity"] > 1
    out = llm.demonstrate_paged_attention(model="tiny", device="cpu", quick=True, plots=True)
    assert all(r["identical tokens"] for r in out["real_model"])
    assert (tmp_path / "s4_kv_utilization.png").exists()
    rows = llm.demonstrate_kv_cache(model="tiny", device="cpu", quick=True, plots=True)["speedup"]
    assert rows[0]["identical tokens"] is True and (tmp_path / "s3_kv_cache_per_token.png").exists()
    assert rows[-1]["speedup (×)"] > rows[1]["speedup (×)"]  # the gap grows with length
    assert "Takeaway" in capsys.readouterr().out
    with pytest.raises(llm.InvalidArgumentError):
        llm.demonstrate_generation(model="tiny", max_new_tokens=0)


def test_opens_as_a_notebook():
    """jupytext reads the file as a notebook (prose cells as markdown) and writes it back unchanged."""
    jupytext = pytest.importorskip("jupytext")
    text = MODULE_PATH.read_text()
    nb = jupytext.reads(text, fmt="py:percent")
    headings = [c.source.splitlines()[0] for c in nb.cells
                if c.cell_type == "markdown" and c.source.startswith("## §")]
    assert [h.split()[1] for h in headings] == ["§0", "§1", "§1b", "§2", "§3", "§4", "§5", "§6", "§7",
                                                "§8", "§9", "§10"]
    assert jupytext.writes(nb, fmt="py:percent").splitlines()[13:] == text.splitlines()[13:]


# ---------------------------------------------------------------------------------------------
# one naming convention (documented in the opening cell)
# ---------------------------------------------------------------------------------------------
def _public_functions(llm, prefix):
    import inspect
    return {name: fn for name, fn in vars(llm).items()
            if name.startswith(prefix) and inspect.isfunction(fn) and fn.__module__ == llm.__name__}


def test_every_demo_takes_the_same_keywords(llm):
    import inspect
    demos = _public_functions(llm, "demonstrate_")
    assert len(demos) == len(llm.demo_sections()), "every demo is listed, every listed name is a demo"
    for name, fn in demos.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:6] == ["model", "device", "seed", "quick", "plots", "measured"], name
        assert params["model"].default == "smollm2", name
        assert all(p.kind is p.KEYWORD_ONLY for p in list(params.values())[1:]), name


def test_list_follows_the_file_order(llm):
    import inspect
    listed = [fn.__name__ for _, fn in llm.demo_sections().values()]
    in_file = sorted(_public_functions(llm, "demonstrate_").values(),
                     key=lambda fn: inspect.getsourcelines(fn)[1])
    assert listed == [fn.__name__ for fn in in_file]


def test_every_demo_returns_a_report_of_rows(llm, tmp_path, monkeypatch, capsys):
    """Tiny model, quick sizes, no figures: each demo returns a Report whose tables are Rows."""
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    measured = {}
    for name, (_, fn) in llm.demo_sections().items():
        report = fn(model="tiny", device="cpu", quick=True, plots=False, measured=measured)
        measured[name] = report
        assert isinstance(report, llm.Report), name
        assert report and all(isinstance(v, llm.Rows) for v in report.values()), (name, report)
    capsys.readouterr()


def test_analyze_and_measure_return_rows(llm):
    """A sample of the table functions at their smallest sizes: each returns Rows."""
    assert isinstance(llm.analyze_memory_requirements(), llm.Rows)
    assert isinstance(llm.analyze_decode_ridge(), llm.Rows)
    assert isinstance(llm.analyze_speculative_decoding(), llm.Rows)
    assert isinstance(llm.analyze_flash_decoding(), llm.Rows)
    rows = llm.measure_kv_cache("tiny", new_tokens=(4,), device="cpu", checked_tokens=2, num_positions=2)
    assert isinstance(rows, llm.Rows) and rows.steps
