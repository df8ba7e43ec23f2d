"""§1b Perplexity: a hand-worked uniform case, the fixed text slices, and HF transformers as peer."""

import math

import pytest
import torch


def test_uniform_model_has_perplexity_vocab_size(llm):
    model = llm.build_model("tiny", seed=0, device="cpu")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0, every token has probability 1/V
    ids = list(range(100))
    assert llm.evaluate_perplexity(model, ids, window=16, show_progress=False) == pytest.approx(
        model.cfg.vocab_size, rel=1e-5)


def test_perplexity_is_exp_of_mean_nll_over_windows(llm):
    model = llm.build_model("tiny", seed=3, device="cpu")
    ids = torch.randint(0, model.cfg.vocab_size, (23,), generator=torch.Generator().manual_seed(0))
    nll, n = 0.0, 0
    for s in range(0, 23, 8):  # windows [0:8], [8:16], [16:23]; first token of each unscored
        chunk = ids[s:s + 8]
        logp = model.forward_batch(chunk[None])[0, :-1].log_softmax(-1)
        nll -= logp.gather(1, chunk[1:, None]).sum().item()
        n += len(chunk) - 1
    got = llm.evaluate_perplexity(model, ids.tolist(), window=8, show_progress=False)
    assert got == pytest.approx(math.exp(nll / n), rel=1e-6)


def test_text_slices_fixed_and_disjoint(llm):
    tok = llm.ByteTokenizer()
    a, b = llm.text_slices(tok), llm.text_slices(tok)
    assert a == b
    assert len(a["eval"]) == llm.EVAL_TOKENS and len(a["calibration"]) == llm.CALIBRATION_TOKENS
    ids = tok.encode(llm.reference_text())
    assert ids[:llm.EVAL_TOKENS] == a["eval"]
    assert llm.CALIBRATION_OFFSET >= llm.EVAL_TOKENS  # no overlap
    assert "assert" in llm.reference_text()


def test_bad_input(llm):
    model = llm.build_model("tiny", device="cpu")
    with pytest.raises(llm.InvalidArgumentError, match="window"):
        llm.evaluate_perplexity(model, [1, 2, 3], window=1)
    with pytest.raises(llm.InvalidArgumentError, match="at least 2"):
        llm.evaluate_perplexity(model, [1], window=8)


def test_perplexity_matches_hf(llm, smollm2_gguf, hf_smollm2):
    ours, tok = llm.get_model(smollm2_gguf, device="cpu")
    ids = llm.text_slices(tok)["eval"][:256]
    hf = hf_smollm2[0]
    with torch.no_grad():
        loss = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    got = llm.evaluate_perplexity(ours, ids, window=256, show_progress=False)
    assert got == pytest.approx(math.exp(loss), rel=1e-4)
    assert 2 < got < 100  # a real language model on English prose


def test_one_perplexity_baseline_per_run(llm, monkeypatch):
    """Appendix C's demo, §8 and Appendix A share one measured baseline on the same tokens."""
    monkeypatch.setattr(llm, "_BASELINE_PPL", {})
    calls = []
    real = llm.evaluate_perplexity
    monkeypatch.setattr(llm, "evaluate_perplexity", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    first = llm.baseline_perplexity("tiny", "cpu", quick=True)
    shown = llm.demonstrate_perplexity(model="tiny", device="cpu", quick=True)["perplexity"][0]
    assert shown["perplexity"] == first and len(calls) == 1  # measured once, reused
    assert calls == [shown["tokens"]] == [256]
