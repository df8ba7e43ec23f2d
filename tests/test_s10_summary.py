"""§10 Summary: every row of the technique table holds a value measured by the sections' own
functions, and the whole script runs every section end to end (quick, tiny model)."""

import re

import pytest
from conftest import load_lesson

llm_module = load_lesson()


def test_summary_rows_are_measured(llm):
    rows = llm.measure_optimization_summary("tiny", "cpu", quick=True)
    techniques = [r["technique"].split(" (")[0] for r in rows]
    assert techniques == ["KV cache", "PagedAttention", "Prefix caching", "Continuous batching",
                          "Speculative decoding", "INT4 weights", "Flash-decoding", "CUDA graphs"]
    for r in rows[:-1]:  # CUDA graphs says "needs a GPU" on a CPU
        assert re.search(r"\d", r["measured here"]) and "nan" not in r["measured here"], r
        assert r["how it was measured"] and r["why"]


def test_summary_claims_come_from_the_opening_table(llm):
    """Every claimed number the summary checks appears in the opening cell's table of claims,
    which names its source."""
    rows = llm.measure_optimization_summary("tiny", "cpu", quick=True)
    table = llm.__doc__.split("What the field claims")[1]
    for r in rows:
        for claim in (r["claimed speedup"], r["claimed memory saving"]):
            if claim != "—":
                line = next((ln for ln in table.splitlines() if claim in ln), None)
                assert line is not None, f"{claim!r} ({r['technique']}) is not in the claims table"
                assert line.rstrip(" |").rsplit("|", 1)[1].strip(), f"{claim!r} has no source"


MEASUREMENTS = ("measure_kv_cache", "analyze_kv_utilization", "analyze_prefix_caching",
                "measure_continuous_batching", "measure_speculative_decoding", "measure_flash_decoding")


def test_main_quick_runs_every_section(llm, capsys, monkeypatch):
    calls = {name: 0 for name in MEASUREMENTS}

    def counting(name, fn):
        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name in MEASUREMENTS:
        monkeypatch.setattr(llm, name, counting(name, getattr(llm, name)))
    assert llm.main(["--quick", "--no-plots", "--model", "tiny", "--device", "cpu"]) == 0
    # the summary reads the sections' measurements from this run instead of measuring again
    assert calls == {name: 1 for name in MEASUREMENTS}, calls
    out = capsys.readouterr().out
    for name, (title, fn) in llm.demo_sections().items():
        assert fn is not None, f"section {name} has no demo"
        assert title in out, f"section {title!r} did not run"
    assert "The techniques, measured on" in out


def test_run_on_vllm_skips_cleanly_without_vllm():
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here: the script would run the whole comparison")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_on_vllm.py"
    done = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "vLLM is not installed" in done.stdout and "pip install vllm" in done.stdout
