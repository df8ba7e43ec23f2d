"""Import the lesson module by file name (it starts with a digit) for the benchmark scripts."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_lesson():
    spec = importlib.util.spec_from_file_location("llm_lesson", ROOT / "01_llm_inference_optimization.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["llm_lesson"] = module
    spec.loader.exec_module(module)
    return module
