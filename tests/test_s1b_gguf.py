"""§1b Real weights: the GGUF reader and the block dequantizers.

The peer is llama.cpp's own Python package `gguf` (gguf-py): its GGUFReader, its dequantizers and
its GGUFWriter (to build small valid files that the tests then corrupt).
"""

import struct
import time

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as PeerType  # noqa: E402

BLOCK_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]
PLAIN_TYPES = ["F32", "F16", "BF16"]
# Byte offsets of the fp16 scale fields inside one block (random bytes there could be NaN/inf).
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def bits(x: np.ndarray) -> np.ndarray:
    """float32 → its bit patterns, so equality is exact (signed zeros and NaN payloads included)."""
    assert x.dtype == np.float32
    return x.view(np.uint32)


# ---------------------------------------------------------------- the real file, against gguf-py
@pytest.fixture(scope="module")
def peer_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def ours(llm, smollm2_gguf):
    return llm.read_gguf(smollm2_gguf)


def test_tensor_table_matches_gguf_py(llm, ours, peer_reader):
    assert list(ours.tensors) == [t.name for t in peer_reader.tensors]
    assert ours.data_offset == peer_reader.data_offset and ours.alignment == peer_reader.alignment
    for peer in peer_reader.tensors:
        t = ours.tensors[peer.name]
        assert t.shape == tuple(reversed(peer.shape.tolist()))  # GGUF's ne[] is reversed
        assert int(t.ggml_type) == int(peer.tensor_type)
        assert (t.offset, t.nbytes) == (peer.data_offset, peer.n_bytes)
        assert t.data.dtype == np.uint8 and not t.data.flags.writeable and not t.data.flags.owndata


def test_every_tensor_dequantizes_exactly_as_gguf_py(ours, peer_reader):
    for peer in peer_reader.tensors:
        expected = gguf.quants.dequantize(peer.data, peer.tensor_type)
        got = ours.dequantize(peer.name)
        assert got.dtype == np.float32 and got.shape == expected.shape, peer.name
        assert np.array_equal(bits(got), bits(np.ascontiguousarray(expected))), peer.name


def test_metadata_matches_gguf_py(ours, peer_reader):
    assert ours.version == peer_reader.fields["GGUF.version"].contents()
    peer_keys = [k for k in peer_reader.fields if not k.startswith("GGUF.")]  # skip its header pseudo-keys
    assert list(ours.metadata) == peer_keys
    for key in peer_keys:
        expected = peer_reader.fields[key].contents()
        assert ours.metadata[key] == expected, key
        assert type(ours.metadata[key]) is type(expected), key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == ours.metadata["llama.vocab_size"] == 49152


def test_smollm2_shapes_match_pytorch_convention(llm, ours):
    # nn.Linear(in=1536, out=576).weight is (576, 1536); GGUF stores ne = [1536, 576].
    assert ours.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
    assert ours.tensors["token_embd.weight"].shape == (49152, 576)
    rows = {r["type"]: r for r in llm.analyze_gguf_storage(ours)}
    assert rows["Q4_1"]["bits/weight"] == 5.0 and rows["Q8_0"]["bits/weight"] == 8.5


# ---------------------------------------------------------------- the type table
def test_type_ids_and_block_sizes_match_gguf_py(llm):
    for t in llm.GGMLType:
        assert PeerType[t.name] == t.value, t.name
        if t.name == "Q8_1":  # gguf-py lists 40 bytes (fp32 d, s); ggml's block_q8_1 is 36 (fp16)
            assert llm.GGML_BLOCK_SIZES[t] == (32, 36)
            continue
        assert llm.GGML_BLOCK_SIZES[t] == gguf.GGML_QUANT_SIZES[PeerType[t.name]], t.name
    for name in BLOCK_TYPES + PLAIN_TYPES:
        assert getattr(llm.GGMLType, name) in llm.GGML_BLOCK_SIZES


# ---------------------------------------------------------------- random blocks, every type
def random_raw(llm, name: str, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random bytes for a tensor of `shape` (rows, cols); fp16 scale fields made finite."""
    ggml_type = llm.GGMLType[name]
    block_size, type_size = llm.GGML_BLOCK_SIZES[ggml_type]
    n_blocks = shape[0] * shape[1] // block_size
    blocks = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for at in FP16_FIELDS.get(name, []):
        scale = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)  # finite, incl. tiny ones
        blocks[:, at:at + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(shape[0], -1)  # (rows, bytes per row), the layout gguf-py expects


@pytest.mark.parametrize("name", BLOCK_TYPES + PLAIN_TYPES)
def test_random_blocks_dequantize_exactly_as_gguf_py(llm, name, monkeypatch):
    monkeypatch.setattr(llm, "DEQUANT_CHUNK_BLOCKS", 7)  # several chunks, and a partial last one
    rng = np.random.default_rng(1234)
    block_size = llm.GGML_BLOCK_SIZES[llm.GGMLType[name]][0]
    shape = (5, 12 * max(block_size, 32))  # 5 rows of 12+ blocks
    raw = random_raw(llm, name, rng, shape)
    expected = np.ascontiguousarray(gguf.quants.dequantize(raw, PeerType[name]))
    got = llm.dequantize(raw.reshape(-1), llm.GGMLType[name], shape)
    assert got.shape == expected.shape == shape and got.dtype == np.float32
    assert np.array_equal(bits(got), bits(expected))  # F16/BF16/F32 may hold NaN: compare bits
    if name in BLOCK_TYPES:
        assert np.isfinite(got).all()


# ---------------------------------------------------------------- hand-worked blocks
def test_hand_worked_q8_0_and_q4_0_blocks(llm):
    # Q8_0: d = 0.25 (exact in fp16), q = -16..15 → x = q / 4.
    q = np.arange(-16, 16, dtype=np.int8)
    raw = np.frombuffer(np.float16(0.25).tobytes() + q.tobytes(), np.uint8)
    assert llm.dequantize(raw, llm.GGMLType.Q8_0, (32,)).tolist() == [v / 4 for v in range(-16, 16)]
    # Q4_0: d = 0.5; byte j holds element j (low nibble = j) and element j + 16 (high nibble = 15 - j).
    qs = bytes(j | (15 - j) << 4 for j in range(16))
    raw = np.frombuffer(np.float16(0.5).tobytes() + qs, np.uint8)
    expected = [(j - 8) * 0.5 for j in range(16)] + [(15 - j - 8) * 0.5 for j in range(16)]
    assert llm.dequantize(raw, 2, (32,)).tolist() == expected  # plain int type ids work too


def test_hand_worked_q4_k_block(llm):
    """d = 1, dmin = 0.5; scale s_j = j + 1 except s_4 = 53 (needs 6 bits); all mins 0 but m_5 = 35."""
    sc = bytearray(12)
    for j in range(4):
        sc[j] = j + 1  # s_0..s_3 in the low 6 bits of bytes 0..3
    sc[8:12] = bytes([53 & 15, 6, 7, 8])  # low 4 bits of s_4..s_7 (m_4..m_7 in the high nibbles)
    sc[0] |= (53 >> 4) << 6  # top 2 bits of s_4 sit in the spare top bits of byte 0
    sc[9] |= (35 & 15) << 4  # low 4 bits of m_5 ...
    sc[5] |= (35 >> 4) << 6  # ... top 2 bits in the spare top bits of byte 5 (byte 5 = m_1 = 0)
    qs = bytes([0x21]) * 128  # chunk c: low nibbles (q = 1) → sub-block 2c, high (q = 2) → 2c+1
    raw = np.frombuffer(np.float16(1.0).tobytes() + np.float16(0.5).tobytes() + bytes(sc) + qs, np.uint8)
    scales, mins = [1, 2, 3, 4, 53, 6, 7, 8], [0, 0, 0, 0, 0, 35, 0, 0]
    expected = [scales[i // 32] * (1 if (i // 32) % 2 == 0 else 2) - 0.5 * mins[i // 32] for i in range(256)]
    assert llm.dequantize(raw, llm.GGMLType.Q4_K, (256,)).tolist() == expected


# ---------------------------------------------------------------- dequantize's own errors
def test_dequantize_rejects_bad_input(llm):
    raw = np.zeros(34, np.uint8)
    with pytest.raises(llm.GGUFError, match="needs 68 bytes"):
        llm.dequantize(raw, llm.GGMLType.Q8_0, (64,))
    with pytest.raises(llm.GGUFError, match="blocks of 32"):
        llm.dequantize(raw, llm.GGMLType.Q8_0, (2, 16))
    with pytest.raises(llm.GGUFError, match="Q3_K"):
        llm.dequantize(np.zeros(110, np.uint8), llm.GGMLType.Q3_K, (256,))
    with pytest.raises(llm.GGUFError, match="unknown ggml type id 99"):
        llm.dequantize(raw, 99, (32,))
    with pytest.raises(llm.GGUFError, match="uint8"):
        llm.dequantize(raw.view(np.int8), llm.GGMLType.Q8_0, (32,))


# ---------------------------------------------------------------- small files built with GGUFWriter
METADATA = {  # key -> (writer method or value type, value)
    "t.u8": ("uint8", 200), "t.i8": ("int8", -100), "t.u16": ("uint16", 60000), "t.i16": ("int16", -30000),
    "t.u32": ("uint32", 4_000_000_000), "t.i32": ("int32", -2_000_000_000), "t.f32": ("float32", 0.5),
    "t.u64": ("uint64", 2**63 + 5), "t.i64": ("int64", -(2**62)), "t.f64": ("float64", 0.1),
    "t.yes": ("bool", True), "t.no": ("bool", False), "t.str": ("string", "héllo ✓"),
    "t.strs": ("array", ["a", "", "ü"]), "t.ints": ("array", [1, -2, 3]), "t.floats": ("array", [0.5, 2.0]),
    "t.nested": ("array", [[1, 2], [3]]), "t.nested_strs": ("array", [["x"], ["y", "z"]]),
    "t.bools": ("array", [True, False]),
}


def write_small_gguf(path, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A valid GGUF: METADATA, an F32 tensor and a Q8_0 tensor. Returns the tensors' values."""
    w = gguf.GGUFWriter(path, "llama")
    for key, (kind, value) in METADATA.items():
        getattr(w, f"add_{kind}")(key, value)
    w.add_key_value("t.u64s", [1, 2**64 - 1], gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.UINT64)
    if alignment:
        w.add_custom_alignment(alignment)
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3)
    q8 = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 64)
    w.add_tensor("dense", f32)
    w.add_tensor("quant", gguf.quants.quantize(q8, PeerType.Q8_0), raw_dtype=PeerType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"dense": f32, "quant": gguf.quants.dequantize(gguf.quants.quantize(q8, PeerType.Q8_0),
                                                          PeerType.Q8_0)}


@pytest.mark.parametrize("alignment", [None, 64])
def test_small_file_round_trip(llm, tmp_path, alignment):
    path = tmp_path / "small.gguf"
    values = write_small_gguf(path, alignment)
    f = llm.read_gguf(path)
    assert f.version == 3 and f.alignment == (alignment or 32)
    for key, (_, value) in METADATA.items():
        assert f.metadata[key] == value and type(f.metadata[key]) is type(value), key
    assert f.metadata["t.f32"] == 0.5 and f.metadata["t.u64s"] == [1, 2**64 - 1]
    peer = gguf.GGUFReader(path)
    for t in peer.tensors:
        assert f.tensors[t.name].offset == t.data_offset
        assert f.tensors[t.name].offset % f.alignment == 0
    for name, value in values.items():
        assert np.array_equal(f.dequantize(name), value)
    with pytest.raises(llm.GGUFError, match="no tensor 'nope'"):
        f.dequantize("nope")


def test_missing_file(llm, tmp_path):
    with pytest.raises(llm.GGUFError, match="no such file"):
        llm.read_gguf(tmp_path / "absent.gguf")


def test_empty_array_and_no_tensors(llm, tmp_path):
    key = b"empty"
    kv = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 4, 0)  # ARRAY of UINT32, count 0
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 2, 0, 1) + kv)
    f = llm.read_gguf(path)
    assert (f.version, f.metadata, f.tensors) == (2, {"empty": []}, {})


# ---------------------------------------------------------------- malformed files
def tensor_info_at(data: bytes, name: str) -> int:
    """Byte offset of tensor `name`'s n_dims field (just after its name) in the file."""
    i = data.index(struct.pack("<Q", len(name)) + name.encode())
    return i + 8 + len(name)


def corrupt(data: bytes, what: str) -> bytes:
    """A copy of a valid small GGUF file with one defect."""
    b = bytearray(data)
    quant = tensor_info_at(data, "quant")  # n_dims (4) + 2 × ne (16) + type (4) + offset (8)
    if what == "magic":
        b[0:4] = b"GGML"
    elif what == "version":
        b[4:8] = struct.pack("<I", 1)
    elif what == "big-endian":
        b[4:8] = struct.pack(">I", 3)
    elif what == "empty":
        return b""
    elif what == "truncated header":
        return bytes(b[:20])
    elif what == "truncated metadata":
        return bytes(b[:60])  # fails the count check: 21 entries cannot fit in 36 bytes
    elif what == "truncated mid-metadata":
        return bytes(b[:data.index("héllo".encode()) + 3])  # ends inside the value of 't.str'
    elif what == "truncated data":
        return bytes(b[:-40])  # 'quant' (136 bytes + 24 of padding) is last: lose its last 16
    elif what == "offset past end":
        b[quant + 24:quant + 32] = struct.pack("<Q", 1 << 40)
    elif what == "unknown type":
        b[quant + 20:quant + 24] = struct.pack("<I", 99)
    elif what == "too many dims":
        b[quant:quant + 4] = struct.pack("<I", 1 << 31)
    elif what == "2^60 metadata entries":
        b[16:24] = struct.pack("<Q", 1 << 60)
    elif what == "2^60 tensors":
        b[8:16] = struct.pack("<Q", 1 << 60)
    elif what == "huge string":
        b[24:32] = struct.pack("<Q", 1 << 60)  # the length of the first key
    elif what == "huge array":
        i = data.index(b"t.strs") + len("t.strs") + 4 + 4  # after value type ARRAY and element type
        b[i:i + 8] = struct.pack("<Q", 1 << 60)
    elif what in ("huge string in an array", "bad UTF-8 in an array"):
        i = data.index(b"t.strs") + len("t.strs") + 4 + 4 + 8  # the length of its first element, "a"
        if what == "huge string in an array":
            b[i:i + 8] = struct.pack("<Q", 1 << 60)
        else:
            b[i + 8] = 0xFF  # "a" → a byte that starts no UTF-8 character
    elif what == "unknown value type":
        i = data.index(b"t.u8") + len("t.u8")
        b[i:i + 4] = struct.pack("<I", 77)
    return bytes(b)


MALFORMED = {  # defect -> a phrase the message must contain
    "magic": "bad magic", "version": "unsupported GGUF version 1", "big-endian": "big-endian",
    "empty": "truncated", "truncated header": "truncated", "truncated metadata": "truncated",
    "truncated mid-metadata": "truncated file",
    "truncated data": "'quant' spans bytes", "offset past end": "'quant' spans bytes",
    "unknown type": "unknown ggml type id 99", "too many dims": "dimensions",
    "2^60 metadata entries": "metadata entry count is 1152921504606846976",
    "2^60 tensors": "tensor info count", "huge string": "truncated", "huge array": "element count",
    "unknown value type": "unknown value type id 77",
    "huge string in an array": "truncated", "bad UTF-8 in an array": "not valid UTF-8",
}


@pytest.fixture(scope="module")
def small_gguf_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    write_small_gguf(path)
    return path.read_bytes()


@pytest.mark.parametrize("what", list(MALFORMED))
def test_malformed_file_raises_helpful_error_quickly(llm, tmp_path, small_gguf_bytes, what):
    path = tmp_path / "bad.gguf"
    path.write_bytes(corrupt(small_gguf_bytes, what))
    t0 = time.perf_counter()
    with pytest.raises(llm.GGUFError) as info:
        llm.read_gguf(path)
    assert time.perf_counter() - t0 < 0.5  # no looping over, or allocating for, absurd counts
    message = str(info.value)
    assert MALFORMED[what] in message, message
    assert "offset" in message and str(path) in message, message
    assert isinstance(info.value, llm.LessonError)
