"""§8 part II: our block quantizers produce the bytes of llama.cpp's `gguf` package for the simple
types (random and adversarial blocks); K-quant blocks decode identically through gguf-py and
through ours and beat the simple types' error; a written GGUF file reads back equal through
gguf-py and our reader; a model written and reloaded has exactly the weights of the in-memory
quantization; bad input is refused and leaves no file."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_lesson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------- the writer writes what readers read
def both_readers(llm, path):
    """(our GGUFFile, gguf-py's GGUFReader) of one file: both must open it."""
    return llm.read_gguf(path), gguf.GGUFReader(path)


def peer_bytes(reader, name):
    (t,) = [t for t in reader.tensors if t.name == name]
    return np.asarray(t.data).view(np.uint8).reshape(-1), t


def test_metadata_alignment_lays_out_the_file(llm, tmp_path):
    """`general.alignment` in the metadata is the layout's alignment, whatever the header length."""
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    for n in range(1, 70, 3):  # key lengths: header lengths of every residue mod 64
        path = llm.write_gguf(tmp_path / "a.gguf", {"general.alignment": 64, "k" * n: 1}, {"w": x})
        ours, peer = both_readers(llm, path)
        assert ours.alignment == 64 and ours.data_offset % 64 == 0 and peer.alignment == 64
        assert np.array_equal(ours.dequantize("w"), x)
        assert np.array_equal(peer_bytes(peer, "w")[0], x.view(np.uint8).reshape(-1))
    path = llm.write_gguf(tmp_path / "b.gguf", {}, {"w": x}, alignment=128)  # the argument is declared too
    assert llm.read_gguf(path).metadata["general.alignment"] == 128
    assert llm.read_gguf(path).metadata_types["general.alignment"] == llm.GGUFValueType.UINT32


@pytest.mark.parametrize("kwargs,match", [
    *[(dict(alignment=a), "power of two") for a in (0, 3, 4, True, 2**32, 64.0)],
    (dict(alignment=32, metadata={"general.alignment": 64}), "declares"),
    (dict(metadata={"general.alignment": 64}, types={"general.alignment": "UINT64"}), "UINT32"),
    (dict(tensors={"w": np.zeros((1, 1, 1, 1, 2), np.float32)}), "1 to 4 dimensions"),
    (dict(tensors={"w": np.array(1.0, np.float32)}), "1 to 4 dimensions"),
    (dict(tensors={"n" * 64: np.zeros(2, np.float32)}), "63 UTF-8 bytes"),
    (dict(tensors={"w": np.zeros(2, np.bool_)}), "no GGUF type"),
    (dict(tensors={"w": (np.zeros(34, np.int8), "Q8_0", (32,))}), "uint8"),  # bytes, not int8 codes
    (dict(tensors={"w": (np.zeros(34, np.uint8), "Q8_0", (-32,))}), "non-negative"),
    (dict(tensors={"w": 5}), "give an array"),
    (dict(metadata={"x": 2**70}), "no GGUF integer type"),
    (dict(metadata={"x": [-1, 2**63]}), "mixes negative values"),
    (dict(metadata={"x": 300}, types={"x": "UINT8"}), "0..255"),
    (dict(metadata={"x": [1, 300]}, types={"x": ("ARRAY", "UINT8")}), "0..255"),
    (dict(metadata={"x": 1e39}, types={"x": "FLOAT32"}), "FLOAT64"),
    (dict(metadata={"x": 7}, types={"x": "STRING"}), "needs a str"),
])
def test_write_gguf_refuses_what_readers_refuse_and_leaves_no_file(llm, tmp_path, kwargs, match):
    kwargs = {"metadata": {}, "tensors": {}, **kwargs}
    types = {k: (tuple(llm.GGUFValueType[t] for t in v) if isinstance(v, tuple) else llm.GGUFValueType[v])
             for k, v in kwargs.pop("types", {}).items()}
    tensors = {k: (v[0], llm.GGMLType[v[1]], v[2]) if isinstance(v, tuple) else v
               for k, v in kwargs.pop("tensors").items()}
    with pytest.raises(llm.GGUFError, match=match):
        llm.write_gguf(tmp_path / "bad.gguf", kwargs.pop("metadata"), tensors, types=types, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_metadata_integer_arrays_get_a_type_wide_enough(llm, tmp_path):
    metadata = {"a": [-1, 2**31], "b": [-1, 2**33], "c": [1, 2**63], "d": [1, 2**31], "e": [-5, 7],
                "f": -(2**40)}
    expected = {"a": "INT64", "b": "INT64", "c": "UINT64", "d": "UINT32", "e": "INT32", "f": "INT64"}
    ours, peer = both_readers(llm, llm.write_gguf(tmp_path / "i.gguf", metadata, {}))
    for key, value in metadata.items():
        assert ours.metadata[key] == value
        vtype = ours.metadata_types[key]
        assert (vtype[1] if isinstance(vtype, tuple) else vtype) == llm.GGUFValueType[expected[key]], key
        assert peer.fields[key].contents() == value


def test_bare_arrays_are_written_in_their_dtype(llm, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 8))
    bf16 = torch.from_numpy(x).bfloat16()
    tensors = {"f32": x.astype(np.float32), "f16": x.astype(np.float16), "f64": x, "bf16": bf16,
               "i8": np.arange(-4, 4, dtype=np.int8), "i64": np.array([-(2**62), 2**62]),
               "t32": torch.from_numpy(x.astype(np.float32)).T,  # a strided torch tensor
               "be": x.astype(">f4")}  # big-endian input, stored little-endian
    kinds = {"f32": "F32", "f16": "F16", "f64": "F64", "bf16": "BF16", "i8": "I8", "i64": "I64", "t32": "F32",
             "be": "F32"}
    ours, peer = both_readers(llm, llm.write_gguf(tmp_path / "bare.gguf", {}, tensors))
    for name, value in tensors.items():
        t = ours.tensors[name]
        assert t.ggml_type == llm.GGMLType[kinds[name]] and t.shape == tuple(value.shape), name
        if name == "bf16":
            want = bf16.view(torch.int16).numpy().view(np.uint8).reshape(-1)
            assert np.array_equal(ours.dequantize(name), bf16.float().numpy())
        else:
            want = np.ascontiguousarray(np.asarray(value), dtype=np.asarray(value).dtype.newbyteorder("<"))
            want = want.view(np.uint8).reshape(-1)
        assert np.array_equal(t.data, want), name
        data, peer_t = peer_bytes(peer, name)
        assert np.array_equal(data, want) and peer_t.tensor_type == gguf.GGMLQuantizationType[kinds[name]]


@pytest.mark.parametrize("ggml_type", ["F32", "F16", "BF16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"])
def test_quantize_blocks_takes_strided_arrays(llm, tmp_path, ggml_type):
    x = np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)
    t = llm.GGMLType[ggml_type]
    for view in (x.T[:8], x[:4, ::2], torch.from_numpy(x).T[:2]):
        want = llm.quantize_blocks(np.ascontiguousarray(np.asarray(view)), t)
        assert np.array_equal(llm.quantize_blocks(view, t), want)
    path = llm.write_gguf(tmp_path / "s.gguf", {}, {"w": (x.T[:8], t)})
    ours, peer = both_readers(llm, path)
    assert np.array_equal(ours.tensors["w"].data, llm.quantize_blocks(x.T[:8].copy(), t).reshape(-1))
    assert np.array_equal(peer_bytes(peer, "w")[0], ours.tensors["w"].data)


def test_bf16_rounds_like_gguf_py_and_torch(llm):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 64)) * 10.0 ** rng.integers(-30, 30, (16, 1))).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 1e-45, 3.3e38]
    x[1] = np.float32(1) + np.float32(2**-8) * np.arange(64)  # halfway cases: ties to even
    ours = llm.quantize_blocks(x, llm.GGMLType.BF16)
    assert np.array_equal(ours, quants.quantize(x, gguf.GGMLQuantizationType.BF16))
    assert np.array_equal(ours.view("<i2"), torch.from_numpy(x).bfloat16().view(torch.int16).numpy())
    with pytest.raises(llm.GGUFError, match="BF16"):
        llm.quantize_blocks(np.float32([[3.4e38]]), llm.GGMLType.BF16)  # rounds to inf


@pytest.mark.parametrize("ggml_type", ["F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_values_past_fp16_fields_are_refused(llm, ggml_type):
    x = np.linspace(-1, 1, 256, dtype=np.float32)[None]
    for big in (1e9, 1e30):
        with pytest.raises(llm.GGUFError, match="overflow"):
            llm.quantize_blocks(x * big, llm.GGMLType[ggml_type])
    raw = llm.quantize_blocks(x * 6e4, llm.GGMLType[ggml_type])  # fits: finite on the way back
    assert np.isfinite(llm.dequantize(raw.reshape(-1), llm.GGMLType[ggml_type], x.shape)).all()


class StubTokenizer:
    metadata = {"tokenizer.ggml.model": "gpt2"}


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_exports_every_layer(llm, tmp_path, bits):
    net = llm.build_model("tiny", seed=0, device="cpu")
    qnet = llm.quantize_model(net, llm.rtn_quantizer(bits, 32))
    floats, exported = llm.model_to_gguf_tensors(net), llm.model_to_gguf_tensors(qnet)
    assert list(exported) == list(floats) and len(floats) == 20
    for name, w in floats.items():  # the quantized values: within half a step (+ fp16 rounding) of the float
        bound = (w.abs().amax(-1, keepdim=True) / 127 if bits == 8 else w.abs().max() / 7.5) * 0.51 + 1e-6
        assert ((exported[name] - w).abs() <= bound).all(), name
    path = llm.quantize_model_to_gguf(qnet, StubTokenizer(), tmp_path / "q.gguf", "Q8_0", show_progress=False)
    ours, peer = both_readers(llm, path)
    assert list(ours.tensors) == list(floats) == [t.name for t in peer.tensors]


# ---------------------------------------------------------------- hypothesis: random files, both readers
INT_TYPES = {"UINT8": (0, 2**8), "INT8": (-2**7, 2**7), "UINT16": (0, 2**16), "INT16": (-2**15, 2**15),
             "UINT32": (0, 2**32), "INT32": (-2**31, 2**31), "UINT64": (0, 2**64), "INT64": (-2**63, 2**63)}
SCALARS = {**{t: st.integers(lo, end - 1) for t, (lo, end) in INT_TYPES.items()},
           "FLOAT32": st.floats(width=32, allow_nan=False), "FLOAT64": st.floats(allow_nan=False),
           "BOOL": st.booleans(), "STRING": st.text(max_size=8)}
QUANT_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
BARE_DTYPES = ["float32", "float16", "float64", "int8", "int16", "int32", "int64", "bfloat16"]


@st.composite
def metadata_entries(draw):
    """(type name(s) or None for inferred, value): every value type, flat and nested arrays."""
    kind = draw(st.sampled_from([*SCALARS, "ARRAY", "NESTED", "INFERRED"]))
    if kind in SCALARS:
        return kind, draw(SCALARS[kind])
    elem = draw(st.sampled_from(list(SCALARS)))
    if kind == "ARRAY":
        return ("ARRAY", elem), draw(st.lists(SCALARS[elem], max_size=4))
    if kind == "NESTED":
        return ("ARRAY", ("ARRAY", elem)), draw(st.lists(st.lists(SCALARS[elem], max_size=3), max_size=3))
    inferred = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(width=32, allow_nan=False),
                         st.text(max_size=5), st.booleans(),
                         st.lists(st.integers(-2**63, 2**63 - 1), min_size=1, max_size=4),
                         st.lists(st.lists(st.text(max_size=3), max_size=2), min_size=1, max_size=2))
    return None, draw(inferred)


@st.composite
def tensor_specs(draw, llm):
    """(spec for write_gguf, expected raw bytes, ggml type name, NumPy shape); strided inputs, 1-4 dims."""
    kind = draw(st.sampled_from(["bare", "quantize", "raw"]))
    lead = draw(st.lists(st.integers(1, 2), min_size=0, max_size=3))  # small: K-quants take 256 per row
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "bare":
        dtype = draw(st.sampled_from(BARE_DTYPES))
        type_name = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}.get(
            dtype, dtype.replace("int", "I"))
        row = draw(st.integers(1, 5))
    else:
        type_name = draw(st.sampled_from(QUANT_TYPES))
        block = llm.GGML_BLOCK_SIZES[llm.GGMLType[type_name]][0]
        row = block * draw(st.integers(1, 2 if block < 256 else 1))
    shape, layout = (*lead, row), draw(st.sampled_from(["contiguous", "step", "transposed"]))
    base_shape = {"step": (*lead, 2 * row), "transposed": (*shape[:-2], row, shape[-2]) if lead else shape}
    base = rng.standard_normal(base_shape.get(layout, shape)) * 10 ** rng.uniform(-3, 3)
    if dtype_is_int := (kind == "bare" and dtype.startswith("int")):
        base = rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, base.shape, dtype=dtype, endpoint=True)
    values = {"step": base[..., ::2], "transposed": base.swapaxes(-1, -2) if lead else base}.get(layout, base)
    assert values.shape == shape
    if kind == "bare" and dtype == "bfloat16":
        spec = torch.from_numpy(values.astype(np.float32)).bfloat16()
        return spec, spec.contiguous().view(torch.int16).numpy().view(np.uint8).reshape(-1), type_name, shape
    if kind == "bare":
        spec = values if dtype_is_int else values.astype(dtype)
        return spec, np.ascontiguousarray(spec).view(np.uint8).reshape(-1), type_name, shape
    t = llm.GGMLType[type_name]
    expected = llm.quantize_blocks(np.ascontiguousarray(values, dtype=np.float32), t).reshape(-1)
    if type_name in SIMPLE + ["F16", "BF16"]:  # llama.cpp's own quantizers give the same bytes
        peer = quants.quantize(np.ascontiguousarray(values, dtype=np.float32),
                               gguf.GGMLQuantizationType[type_name])
        assert np.array_equal(peer.view(np.uint8).reshape(-1), expected)
    raw = (expected.reshape(*shape[:-1], -1), t, shape)
    spec = (values.astype(np.float32), t) if kind == "quantize" else raw
    return spec, expected, type_name, shape


def check_metadata(llm, ours, peer, key, type_spec, value):
    assert ours.metadata[key] == value, key
    peer_field = peer.fields[key]
    if type_spec is None:
        return
    flat = type_spec if isinstance(type_spec, str) else type_spec[0]
    assert peer_field.types[0] == gguf.GGUFValueType[flat]
    if isinstance(type_spec, str):
        assert ours.metadata_types[key] == llm.GGUFValueType[type_spec] and peer_field.contents() == value
    elif isinstance(type_spec[1], str):
        assert ours.metadata_types[key] == (llm.GGUFValueType.ARRAY, llm.GGUFValueType[type_spec[1]])
        assert peer_field.contents() == value
    else:  # gguf-py's contents() does not descend into nested arrays; it parsed them (and all after)
        assert ours.metadata_types[key] == (llm.GGUFValueType.ARRAY, llm.GGUFValueType.ARRAY)


def as_value_types(llm, spec):
    if isinstance(spec, str):
        return llm.GGUFValueType[spec]
    return (llm.GGUFValueType.ARRAY, as_value_types(llm, spec[1]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_files_round_trip_through_both_readers(llm, data):
    keys = st.text(min_size=1, max_size=10).filter(lambda k: k != "general.alignment")
    metadata = data.draw(st.dictionaries(keys, metadata_entries(), max_size=6), "metadata")
    names = st.text(min_size=1, max_size=12).filter(lambda n: len(n.encode()) < 64)
    tensors = data.draw(st.dictionaries(names, tensor_specs(llm), max_size=4), "tensors")
    alignment = data.draw(st.sampled_from([None, 8, 32, 64, 1024]), "alignment")
    in_metadata = alignment is not None and data.draw(st.booleans(), "alignment in metadata")
    meta = {k: v for k, (_, v) in metadata.items()}
    types = {k: as_value_types(llm, t) for k, (t, _) in metadata.items() if t is not None}
    if in_metadata:
        meta["general.alignment"], alignment = alignment, None
    with tempfile.TemporaryDirectory() as tmp:
        path = llm.write_gguf(Path(tmp) / "r.gguf", meta, {n: spec for n, (spec, *_) in tensors.items()},
                              types=types, alignment=alignment)
        ours, peer = both_readers(llm, path)
        assert ours.alignment == peer.alignment == (meta.get("general.alignment") or alignment or 32)
        for key, (type_spec, value) in metadata.items():
            check_metadata(llm, ours, peer, key, type_spec, value)
        assert list(ours.tensors) == [t.name for t in peer.tensors] == list(tensors)
        for name, (_, expected, type_name, shape) in tensors.items():
            t = ours.tensors[name]
            assert (t.ggml_type.name, t.shape) == (type_name, shape) and np.array_equal(t.data, expected)
            data_bytes, peer_t = peer_bytes(peer, name)
            assert peer_t.tensor_type.name == type_name
            assert tuple(int(n) for n in reversed(peer_t.shape)) == shape
            assert np.array_equal(data_bytes, expected)
            del peer_t
        del ours, peer
