"""§8 part II: our block quantizers produce the bytes of llama.cpp's `gguf` package for the simple
types (random and adversarial blocks); K-quant blocks decode identically through gguf-py and
through ours and beat the simple types' error; a written GGUF file reads back equal through
gguf-py and our reader; a model written and reloaded has exactly the weights of the in-memory
quantization; bad input is refused and leaves no file."""

import numpy as np
import pytest
import torch
from conftest import load_lesson

llm_module = load_lesson()
gguf = pytest.importorskip("gguf")
from gguf import quants  # noqa: E402

SIMPLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def adversarial_rows(seed=0, width=256):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((40, width)) * rng.uniform(1e-3, 10, (40, 1))).astype(np.float32)
    x[0] = 0  # all zero
    x[1] = 3.5  # constant
    x[2] = -np.abs(x[2])  # negative-dominant
    x[3] *= 6e4 / np.abs(x[3]).max()  # huge, but a Q4_1 min still fits fp16 (larger: GGUFError)
    x[4] *= 1e-6  # tiny
    x[5, ::7] = -x[5].max() * 2  # a negative extreme
    x[6, 0] = 1e-3  # one value in a zero block
    x[6, 1:] = 0
    return x


@pytest.mark.parametrize("ggml_type", SIMPLE)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simple_types_bit_exact_with_gguf_py(llm, ggml_type, seed):
    x = adversarial_rows(seed)
    ours = llm.quantize_blocks(x, llm.GGMLType[ggml_type])
    assert np.array_equal(ours, quants.quantize(x, gguf.GGMLQuantizationType[ggml_type]))


@pytest.mark.parametrize("k_type,simple", [("Q4_K", "Q4_1"), ("Q5_K", "Q5_1"), ("Q6_K", "Q5_1")])
def test_k_quants_decode_identically_and_beat_simple_types(llm, k_type, simple):
    x = adversarial_rows(5)[7:]  # ordinary blocks: the error comparison is about typical weights
    raw = llm.quantize_blocks(x, llm.GGMLType[k_type])
    ours = llm.dequantize(raw.reshape(-1), llm.GGMLType[k_type], x.shape)
    theirs = quants.dequantize(raw, gguf.GGMLQuantizationType[k_type]).reshape(x.shape)
    assert np.array_equal(ours, theirs)
    simple_back = llm.dequantize(llm.quantize_blocks(x, llm.GGMLType[simple]).reshape(-1),
                                 llm.GGMLType[simple], x.shape)
    assert ((ours - x) ** 2).mean() <= ((simple_back - x) ** 2).mean()


def test_k_quants_handle_zero_and_constant_blocks(llm):
    x = np.zeros((3, 256), np.float32)
    x[1] = 2.0
    x[2] = -2.0
    for t in ("Q4_K", "Q5_K", "Q6_K"):
        back = llm.dequantize(llm.quantize_blocks(x, llm.GGMLType[t]).reshape(-1), llm.GGMLType[t], x.shape)
        assert np.isfinite(back).all() and np.abs(back - x).max() <= 0.02 * 2


def test_block_field_maps_add_up(llm):
    for t, fields in llm.GGUF_BLOCK_FIELDS.items():
        assert sum(n for _, n in fields) == llm.GGML_BLOCK_SIZES[t][1]


def test_k_quants_beat_simple_types_on_real_weights(llm, smollm2_gguf):
    net, _ = llm.get_model(smollm2_gguf)
    # The file stores these weights as Q4_1: blocks aligned with its grid would give Q4_1 zero error.
    # Shifting by half a block (columns 16 .. 1296, rows of 5 × 256) compares the types fairly.
    w = np.ascontiguousarray(net.layers[3].mlp.w_down.weight.detach().numpy()[:, 16:16 + 1280])
    err = {}
    for t in ("Q4_1", "Q4_K", "Q5_1", "Q5_K", "Q6_K"):
        back = llm.dequantize(llm.quantize_blocks(w, llm.GGMLType[t]).reshape(-1), llm.GGMLType[t], w.shape)
        err[t] = float(((back - w) ** 2).mean())
    assert err["Q4_K"] < err["Q4_1"] and err["Q5_K"] < err["Q5_1"] and err["Q6_K"] < err["Q5_1"]


def test_write_gguf_round_trips(llm, tmp_path):
    metadata = {"general.architecture": "llama", "general.name": "round trip ✓", "test.u32": 7,
                "test.neg": -3,
                "test.big": 2**40, "test.f": 0.25, "test.flag": True, "test.ints": [1, 2, 3],
                "test.strs": ["a", "bé", ""], "test.floats": [0.5, -1.5], "test.nested": [[1, 2], [3]],
                "test.empty": []}
    rng = np.random.default_rng(0)
    tensors = {"a.weight": (rng.standard_normal((4, 64)).astype(np.float32), llm.GGMLType.Q8_0),
               "b.weight": (rng.standard_normal((3, 256)).astype(np.float32), llm.GGMLType.Q4_K),
               "norm.weight": (rng.standard_normal(64).astype(np.float32), llm.GGMLType.F32)}
    path = llm.write_gguf(tmp_path / "t.gguf", metadata, tensors, types={"test.u32": llm.GGUFValueType.UINT8})
    ours = llm.read_gguf(path)
    for key, value in metadata.items():
        assert ours.metadata[key] == value, key
    assert ours.metadata_types["test.u32"] == llm.GGUFValueType.UINT8
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.name"].contents() == "round trip ✓"
    assert list(reader.fields["test.ints"].contents()) == [1, 2, 3]
    for t in reader.tensors:
        expected = llm.quantize_blocks(tensors[t.name][0], tensors[t.name][1])
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), expected.reshape(-1))
        assert tuple(reversed([int(n) for n in t.shape])) == ours.tensors[t.name].shape
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("bad,match", [
    ({"x": (np.zeros((2, 50), np.float32), "Q8_0")}, "multiple of 32"),
    ({"x": (np.array([[np.nan] * 32], np.float32), "Q8_0")}, "finite"),
    ({"x": (np.zeros((2, 32), np.float32), "Q2_K")}, "not implemented"),
])
def test_write_refuses_bad_tensors_and_leaves_no_file(llm, tmp_path, bad, match):
    tensors = {k: (v[0], llm.GGMLType[v[1]]) for k, v in bad.items()}
    with pytest.raises(llm.GGUFError, match=match):
        llm.write_gguf(tmp_path / "bad.gguf", {"general.architecture": "llama"}, tensors)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_bad_metadata(llm, tmp_path):
    with pytest.raises(llm.GGUFError, match="cannot be written"):
        llm.write_gguf(tmp_path / "bad.gguf", {"x": {"a": 1}}, {})
    with pytest.raises(llm.GGUFError, match="mixes element types"):
        llm.write_gguf(tmp_path / "bad.gguf", {"x": [1, "a"]}, {})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(llm.GGUFError, match="scheme"):
        llm.quantize_model_to_gguf(llm.build_model("tiny"), None, tmp_path / "m.gguf", "Q3_K")


@pytest.mark.parametrize("scheme", ["Q4_K_M"])  # mixes Q4_K, Q6_K, Q5_0 and Q8_0
def test_model_written_and_reloaded_has_the_quantized_weights(llm, smollm2_gguf, tmp_path, scheme):
    net, tok = llm.get_model(smollm2_gguf)
    path = llm.quantize_model_to_gguf(net, tok, tmp_path / f"m-{scheme}.gguf", scheme, show_progress=False)
    back, tok2 = llm.load_model(path)
    assert tok2.encode("Hello, world") == tok.encode("Hello, world")
    written = llm.model_to_gguf_tensors(net)
    state = back.state_dict()
    for gname, w in list(written.items())[::7]:  # a sample of tensors, every kind among them
        t = llm._scheme_type(scheme, gname, net.cfg.n_layers, w.shape[-1])
        expected = torch.from_numpy(llm.dequantize(llm.quantize_blocks(w.numpy(), t).reshape(-1), t, w.shape))
        if heads := llm.rope_heads(gname, net.cfg):
            expected = llm.unpermute_rope_rows(expected, heads)
        assert torch.equal(state[llm.gguf_to_param_name(gname)], expected), gname
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    assert len(llm.generate(back, ids, 4)) == 4


def test_llama_cpp_reads_our_file(llm, smollm2_gguf, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is optional")
    net, tok = llm.get_model(smollm2_gguf)
    path = llm.quantize_model_to_gguf(net, tok, tmp_path / "m.gguf", "Q8_0", show_progress=False)
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    ids = tok.encode_chat([{"role": "user", "content": "What is 2 + 2?"}])
    ours = llm.generate(llm.load_model(path)[0], ids, 8)
    model.eval(ids)
    theirs = []
    for _ in range(8):
        t = model.sample(temp=0.0)
        theirs.append(t)
        model.eval([t])
    assert theirs == ours
