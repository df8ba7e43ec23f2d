"""§5 Continuous batching: the engine gives every request the tokens `generate` gives it alone
(greedy and seeded sampling; chunked prefill, prefix caching and preemption by recompute and by
swap on and off), the scheduler keeps its limits, bad requests fail at the call, a failure while
serving one request finishes only that request, and a state machine of random knobs, requests,
bad requests and aborts always drains with `generate`'s tokens and no leaked block."""

import math

import numpy as np
import pytest
from conftest import load_lesson
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

llm_module = load_lesson()


@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=0, device="cpu")


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9] * 3, [4, 5], list(range(40)), [7] * 13,
           [1, 2, 3, 4, 5, 6, 7, 8, 9] * 2]
MAX_TOKENS = (5, 9, 3, 12, 7)


@pytest.mark.parametrize("config", [
    {},
    {"enable_chunked_prefill": False},
    {"enable_prefix_caching": False},
    {"max_num_batched_tokens": 8},  # chunked prefill over several steps
    {"max_num_seqs": 2},
    {"block_size": 4, "num_blocks": 12, "max_num_batched_tokens": 8, "preemption_mode": "recompute"},
    {"block_size": 4, "num_blocks": 12, "max_num_batched_tokens": 8, "preemption_mode": "swap"},
], ids=["default", "no-chunking", "no-prefix-cache", "chunks-of-8", "2-seqs", "recompute", "swap"])
def test_engine_equals_generate_greedy_tiny(llm, tiny, config):
    params = [llm.SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    reference = [llm.generate(tiny, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    engine = llm.LLMEngine(tiny, **{"max_num_seqs": 4, **config})
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finished and o.finish_reason == "length" for o in outs)
    if "num_blocks" in config:
        assert engine.scheduler.num_preemptions > 0 and sum(o.num_preemptions for o in outs) > 0
    engine.block_manager.check_invariants()
    assert engine.block_manager.num_used_blocks == 0  # nothing leaked


@pytest.mark.parametrize("setting", ["blas", "reshaped"])
def test_plain_linear_equals_f_linear_on_smollm2_shapes(llm, monkeypatch, setting):
    """Every way `plain_linear` takes, for every SmolLM2 weight shape and 1 to 40 rows (one row in
    row blocks, 2–32 weight first, more through the BLAS), is within fp32 rounding of the product in
    fp64, and keeps x's leading shape."""
    import torch

    monkeypatch.setenv("LESSON_CPU_LINEAR", setting)
    cfg = llm.ModelConfig.from_name("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.ffn_dim
    blocks = torch.get_num_threads()
    for n, k in ((H * D, d), (Hkv * D, d), (f, d), (d, f), (cfg.vocab_size, d), (d + 1, d)):
        w = torch.randn(n, k, generator=g) * 0.05
        for shape in ((1, k), (k,), (1, 1, k), (2, k), (7, k), (32, k), (2, 3, k), (40, k)):
            x = torch.randn(shape, generator=g)
            rows = x.numel() // k
            expected = "blas" if setting == "blas" or rows > 32 else "weight first" if rows > 1 else \
                "row blocks" if blocks > 1 and n % blocks == 0 else "blas"
            assert llm.cpu_linear_way(x, w) == expected, (n, shape)
            ref = torch.nn.functional.linear(x.double(), w.double()).float()
            y = llm.plain_linear(x, w)
            assert y.shape == ref.shape and y.is_contiguous()
            assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4), (n, k, shape)


def test_reshaped_products_only_for_fp32_on_a_cpu_and_a_known_setting(llm, monkeypatch):
    import torch

    monkeypatch.setenv("LESSON_CPU_LINEAR", "reshaped")
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert llm.cpu_linear_way(x, w) == "weight first"
    assert llm.cpu_linear_way(x.double(), w.double()) == "blas"
    assert llm.cpu_linear_way(x[:1], torch.randn(8, 6).t()) == "blas"  # row blocks need w's rows contiguous
    monkeypatch.setenv("LESSON_CPU_LINEAR", "mkl")
    with pytest.raises(llm.InvalidArgumentError, match="LESSON_CPU_LINEAR"):
        llm.plain_linear(x, w)


def test_model_layers_multiply_through_plain_linear(llm, tiny, monkeypatch):
    """The model's layers are `Linear`: forcing the reshaped products changes the logits of a
    12-token forward and of one-token steps only by rounding, and the engine (packed steps of a few
    rows) still gives `generate`'s tokens with them forced."""
    import torch

    assert all(type(m) is llm.Linear for m in llm.linear_layers(tiny).values())
    ids = list(range(3, 15))
    monkeypatch.setenv("LESSON_CPU_LINEAR", "blas")
    blas = llm.forward_without_cache(tiny, ids)
    blas_one = llm.forward_without_cache(tiny, ids[:1])
    monkeypatch.setenv("LESSON_CPU_LINEAR", "reshaped")
    assert torch.allclose(blas, llm.forward_without_cache(tiny, ids), rtol=1e-4, atol=1e-4)
    assert torch.allclose(blas_one, llm.forward_without_cache(tiny, ids[:1]), rtol=1e-4, atol=1e-4)
    params = [llm.SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    reference = [llm.generate(tiny, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    outs = llm.LLMEngine(tiny, max_num_seqs=4).generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference


needs_onednn = pytest.mark.skipif(not llm_module.onednn_available(llm_module.build_model("tiny")),
                                  reason="this PyTorch has no oneDNN CPU kernels")


@needs_onednn
def test_onednn_linear_equals_f_linear_on_smollm2_shapes(llm):
    """Every SmolLM2 weight shape (q, k/v, o, gate/up, down, head), for 1, 8 and 100 rows, within
    fp32 rounding of F.linear."""
    import torch

    cfg = llm.ModelConfig.from_name("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    H, Hkv, D, d, f = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes = ((H * D, d), (Hkv * D, d), (d, H * D), (f, d), (d, f), (cfg.vocab_size, d))
    for n, k in shapes:
        w = torch.randn(n, k, generator=g) * 0.05
        lin = llm.OneDnnLinear(w)
        for rows in (1, 8, 100):
            x = torch.randn(rows, k, generator=g)
            ref = torch.nn.functional.linear(x.double(), w.double()).float()
            assert torch.allclose(lin(x), ref, rtol=1e-4, atol=1e-4), (n, k, rows)


@needs_onednn
def test_engine_on_onednn_gives_generates_tokens_and_follows_new_weights(llm):
    """`cpu_linear="onednn"` runs a reordered copy of the weights: the same tokens as `generate`,
    and after the weights change in place, the new weights' tokens (the copy is remade)."""
    import torch

    model = llm.build_model("tiny", seed=0, device="cpu")
    params = [llm.SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    engine = llm.LLMEngine(model, max_num_seqs=4, cpu_linear="onednn")
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [llm.generate(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    with torch.no_grad():
        model.layers[0].mlp.w_up.weight.mul_(3.0)  # in place: the version counter moves
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    outs = engine.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [llm.generate(model, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    with pytest.raises(llm.InvalidArgumentError, match="cpu_linear"):
        llm.LLMEngine(model, cpu_linear="mkl")


def test_engine_equals_generate_sampled_tiny(llm, tiny):
    params = [llm.SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=i)
              for i in range(5)]
    reference = [llm.generate(tiny, p, 6, temperature=0.8, top_k=20, top_p=0.9, seed=i)
                 for i, p in enumerate(PROMPTS)]
    outs = llm.LLMEngine(tiny, max_num_seqs=3, max_num_batched_tokens=16).generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference


def test_static_baseline_equals_generate(llm, tiny):
    params = [llm.SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    outs = llm.serve_static_batches(tiny, PROMPTS, params, batch_size=2)
    assert [o.token_ids for o in outs] == [llm.generate(tiny, p, n) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert outs[0].finish_time == outs[1].finish_time < outs[2].finish_time  # batches return whole


def test_streaming_stop_ids_and_abort(llm, tiny):
    engine = llm.LLMEngine(tiny, max_num_seqs=4)
    first = llm.generate(tiny, PROMPTS[2], 8)
    expected = first[:first.index(first[-1]) + 1]  # up to the first occurrence of the stop token
    stop = llm.SamplingParams(max_tokens=8, stop_ids=(first[-1],))
    a = engine.add_request(PROMPTS[2], stop)
    b = engine.add_request(PROMPTS[2], llm.SamplingParams(max_tokens=50))
    seen = []
    while engine.has_unfinished():
        seen += [(o.request_id, len(o.token_ids)) for o in engine.step()]
        if engine.requests[a].output.finished and not engine.requests[b].output.finished:
            engine.abort(b)
    assert engine.requests[a].output.token_ids == expected
    assert engine.requests[a].output.finish_reason == "stop"
    assert engine.requests[b].output.finish_reason == "abort"
    assert [n for r, n in seen if r == a] == list(range(1, len(expected) + 1))  # token by token
    assert engine.block_manager.num_used_blocks == 0


def test_bad_requests_fail_at_the_call_and_leave_others_alone(llm, tiny):
    engine = llm.LLMEngine(tiny, block_size=4, num_blocks=6, max_num_seqs=4)
    ok = engine.add_request([1, 2, 3], llm.SamplingParams(max_tokens=4))
    with pytest.raises(llm.RequestError, match="non-empty"):
        engine.add_request([], llm.SamplingParams())
    with pytest.raises(llm.RequestError, match="context"):
        engine.add_request([1] * 500, llm.SamplingParams(max_tokens=20))
    with pytest.raises(llm.RequestError, match="blocks"):
        engine.add_request([1] * 20, llm.SamplingParams(max_tokens=10))  # 30 tokens > 6 blocks of 4
    with pytest.raises(llm.RequestError, match="max_tokens"):
        llm.SamplingParams(max_tokens=0)
    with pytest.raises(llm.RequestError, match="no request"):
        engine.abort(99)
    with pytest.raises(llm.RequestError, match="prompts but"):
        engine.generate([[1, 2]], [llm.SamplingParams(), llm.SamplingParams()])
    while engine.has_unfinished():
        engine.step()
    assert engine.requests[ok].output.token_ids == llm.generate(tiny, [1, 2, 3], 4)


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 6))
    prompts = [draw(st.lists(st.integers(0, 259), min_size=1, max_size=30)) for _ in range(n)]
    max_tokens = [draw(st.integers(1, 8)) for _ in range(n)]
    config = {"block_size": draw(st.sampled_from([2, 4, 8])), "max_num_seqs": draw(st.integers(1, 4)),
              "max_num_batched_tokens": draw(st.integers(1, 40)),
              "enable_chunked_prefill": draw(st.booleans()), "enable_prefix_caching": draw(st.booleans()),
              "preemption_mode": draw(st.sampled_from(["recompute", "swap"]))}
    need = max(-(-(len(p) + m) // config["block_size"]) for p, m in zip(prompts, max_tokens))
    config["num_blocks"] = need + draw(st.integers(0, 6))  # sometimes barely enough: preemption
    if not config["enable_chunked_prefill"]:  # unchunked, every prompt must fit one step's budget
        config["max_num_batched_tokens"] = max(config["max_num_batched_tokens"], *map(len, prompts))
    return prompts, max_tokens, config


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_the_limits_and_finish(workload):
    llm = llm_module
    prompts, max_tokens, config = workload
    model = llm.build_model("tiny", seed=0, device="cpu")
    engine = llm.LLMEngine(model, **config)
    ids = [engine.add_request(p, llm.SamplingParams(max_tokens=m)) for p, m in zip(prompts, max_tokens)]
    original = engine.scheduler.schedule
    def checked_schedule():  # noqa: E306
        out = original()
        assert out.num_tokens <= config["max_num_batched_tokens"]
        assert len(out.seqs) <= config["max_num_seqs"] and len(set(map(id, out.seqs))) == len(out.seqs)
        engine.block_manager.check_invariants()
        return out
    engine.scheduler.schedule = checked_schedule
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        engine.step()
    outs = [engine.requests[i].output for i in ids]
    assert all(o.finished and len(o.token_ids) == m for o, m in zip(outs, max_tokens))  # none lost
    assert engine.block_manager.num_used_blocks == 0  # none leaked
    for p, m, o in zip(prompts, max_tokens, outs):
        assert o.token_ids == llm.generate(model, p, m)


def test_engine_equals_generate_on_smollm2_with_preemption(llm, smollm2_gguf):
    net, tok = llm.get_model(smollm2_gguf, device="cpu")
    questions = ["What is 2+2?", "Name a color.", "Why is the sky blue? Explain briefly."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    params = [llm.SamplingParams(max_tokens=n) for n in (24, 20, 22)]
    reference = [llm.generate(net, p, sp.max_tokens) for p, sp in zip(prompts, params)]
    prompt_blocks = max(-(-len(p) // 16) for p in prompts)
    for mode in ("recompute", "swap"):  # two prompts fit; their growth then needs a preemption
        engine = llm.LLMEngine(net, num_blocks=2 * prompt_blocks + 1, max_num_seqs=3,
                               max_num_batched_tokens=64, enable_prefix_caching=False, preemption_mode=mode)
        outs = engine.generate(prompts, params)
        assert [o.token_ids for o in outs] == reference
        assert engine.scheduler.num_preemptions > 0


def test_demo_on_tiny(llm, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    rows = llm.demonstrate_continuous_batching(model="tiny", device="cpu", quick=True)["throughput"]
    assert all(r["same tokens as static"] for r in rows)
    assert rows[1]["occupancy %"] > rows[0]["occupancy %"]
    assert len(rows) == 2  # quick: outputs too short to preempt, so no small-pool runs
    assert (tmp_path / "s5_batching_timeline.png").exists() and "Takeaway" in capsys.readouterr().out


def test_small_pool_preempts_with_the_same_tokens(llm):
    sizes = {**llm.batching_sizes(quick=False), "preemption_modes": ("recompute", "swap")}
    rows = llm.measure_continuous_batching("tiny", "cpu", **sizes)
    assert [r["policy"].split(",")[-1].strip() for r in rows[2:]] == ["recompute", "swap"]
    assert all(r["same tokens as static"] for r in rows)
    assert all(r["preemptions"] > 0 for r in rows[2:])


# ---------------------------------------------------------------------------------------------
# The engine always makes progress, or says why at the call
# ---------------------------------------------------------------------------------------------
def drain(engine, max_steps=1000):
    """Step until idle; fails (instead of hanging) if that takes more than max_steps."""
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return
        engine.step()
    raise AssertionError(f"the engine did not finish within {max_steps} steps")


def test_unchunked_prompt_over_the_budget_is_refused_at_the_call(llm, tiny):
    engine = llm.LLMEngine(tiny, enable_chunked_prefill=False, max_num_batched_tokens=8)
    with pytest.raises(llm.RequestError, match="enable_chunked_prefill=True or max_num_batched_tokens >= 20"):
        engine.generate([list(range(20))], llm.SamplingParams(max_tokens=2))
    assert not engine.has_unfinished()  # nothing was queued
    out = engine.generate([list(range(8))], llm.SamplingParams(max_tokens=2))[0]  # fits: served
    assert out.token_ids == llm.generate(tiny, list(range(8)), 2)


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preempted_sequence_longer_than_the_budget_finishes(llm, tiny, mode):
    """Prompts of 10 fit the budget of 16, but a sequence preempted by recompute re-prefills
    prompt + generated tokens (up to 29): its re-prefill is chunked, never left waiting."""
    prompts = [list(range(i, i + 10)) for i in (0, 10, 20)]
    engine = llm.LLMEngine(tiny, enable_chunked_prefill=False, max_num_batched_tokens=16, block_size=4,
                           num_blocks=10, preemption_mode=mode)
    ids = [engine.add_request(p, llm.SamplingParams(max_tokens=20)) for p in prompts]
    drain(engine, max_steps=300)
    outs = [engine.requests[i].output for i in ids]
    assert [o.token_ids for o in outs] == [llm.generate(tiny, p, 20) for p in prompts]
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_step_that_can_schedule_nothing_raises(llm, tiny):
    engine = llm.LLMEngine(tiny, block_size=4, num_blocks=2)
    engine.scheduler.add(llm.SequenceState(0, list(range(20))))  # past add_request's checks
    with pytest.raises(llm.SchedulerStallError, match="scheduled nothing while 1 sequences wait"):
        engine.step()


# ---------------------------------------------------------------------------------------------
# Bad requests fail at the call; a failure inside a step stays with its request
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_p": math.nan}, "top_p"),
    ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"top_k": True}, "top_k"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"temperature": "0"}, "temperature"),
    ({"max_tokens": 2.5}, "max_tokens"), ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop_ids": 5}, "stop_ids"), ({"stop_ids": "ab"}, "stop_ids"), ({"stop_ids": [1.5]}, "stop_ids"),
    ({"seed": 1.5}, "seed"), ({"seed": None}, "seed"),
])
def test_sampling_params_are_checked_at_construction(llm, kwargs, match):
    with pytest.raises(llm.RequestError, match=match):
        llm.SamplingParams(**kwargs)


def test_sampling_params_keep_plain_python_values(llm):
    p = llm.SamplingParams(max_tokens=np.int64(3), temperature=1, top_k=np.int32(5), top_p=1,
                           stop_ids=[np.int64(7), 8], seed=np.int64(2))
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.stop_ids, p.seed) == (3, 1.0, 5, 1.0, (7, 8), 2)
    assert all(type(v) in (int, float) for v in (p.max_tokens, p.temperature, p.top_k, p.top_p, p.seed))


@pytest.mark.parametrize("prompt", [[1.7, 2.9], [True, 2], [1, 260], [-1], "hello", [], 5])
def test_add_request_checks_the_prompt_as_generate_does(llm, tiny, prompt):
    engine = llm.LLMEngine(tiny)
    with pytest.raises(llm.InvalidArgumentError) as from_generate:
        llm.generate(tiny, prompt, 2)
    with pytest.raises(llm.RequestError) as from_engine:
        engine.add_request(prompt, llm.SamplingParams(max_tokens=2))
    assert str(from_engine.value) == str(from_generate.value)  # one validator
    assert not engine.requests and not engine.has_unfinished()
    with pytest.raises(llm.RequestError, match="SamplingParams"):
        engine.add_request([1, 2], {"max_tokens": 2})


def test_latency_metrics_of_a_request_aborted_before_its_first_token(llm, tiny):
    engine = llm.LLMEngine(tiny)
    rid = engine.add_request([1, 2, 3], llm.SamplingParams(max_tokens=4))
    out = engine.requests[rid].output
    assert out.ttft is None and out.latency is None and out.tpot is None
    engine.abort(rid)
    assert out.finish_reason == "abort" and out.ttft is None and out.tpot is None and out.latency >= 0


def test_a_failure_in_sampling_finishes_only_its_request(llm, tiny):
    """A request whose sampling raises (params corrupted after the checks) finishes with an
    error; the request beside it finishes with generate's tokens, and the engine steps on."""
    engine = llm.LLMEngine(tiny, block_size=4, max_num_seqs=4)
    good = engine.add_request(PROMPTS[0], llm.SamplingParams(max_tokens=6))
    bad_params = llm.SamplingParams(max_tokens=6, temperature=0.8)
    object.__setattr__(bad_params, "top_p", 0.0)  # frozen: only a deliberate bypass gets here
    bad = engine.add_request(PROMPTS[1], bad_params)
    drain(engine, max_steps=50)
    out = engine.requests[bad].output
    assert out.finished and out.finish_reason == "error" and "top_p" in out.error
    assert engine.requests[good].output.token_ids == llm.generate(tiny, PROMPTS[0], 6)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    later = engine.generate([PROMPTS[3]], llm.SamplingParams(max_tokens=3))[0]  # not wedged
    assert later.token_ids == llm.generate(tiny, PROMPTS[3], 3)


@pytest.mark.parametrize("decode_step", ["packed", "static"])
def test_a_failure_in_the_forward_finishes_only_its_request(llm, tiny, decode_step):
    """A sequence whose forward raises (an id past the embedding, planted after the checks) is
    found by running the step's sequences one at a time; only its request fails."""
    engine = llm.LLMEngine(tiny, block_size=4, max_num_seqs=4, decode_step=decode_step)
    good = [engine.add_request(p, llm.SamplingParams(max_tokens=5)) for p in PROMPTS[:2]]
    engine.step()  # both prefilled
    bad = engine.add_request(PROMPTS[3], llm.SamplingParams(max_tokens=5))
    engine.step()
    engine.requests[bad].seq.token_ids[-1] = 10**6  # its next decode token
    drain(engine, max_steps=50)
    out = engine.requests[bad].output
    assert out.finish_reason == "error" and "IndexError" in out.error and len(out.token_ids) == 1
    assert [engine.requests[i].output.token_ids for i in good] == [llm.generate(tiny, p, 5)
                                                                   for p in PROMPTS[:2]]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.block_manager.check_invariants()


# ---------------------------------------------------------------------------------------------
# A state machine: random knobs, good and bad requests, aborts, steps
# ---------------------------------------------------------------------------------------------
TINY = llm_module.build_model("tiny", seed=0, device="cpu")
REFERENCE: dict[tuple, list[int]] = {}  # (prompt, max_tokens) -> generate's greedy tokens


def reference(prompt, max_tokens):
    key = (tuple(prompt), max_tokens)
    if key not in REFERENCE:
        REFERENCE[key] = llm_module.generate(TINY, prompt, max_tokens)
    return REFERENCE[key]


REQUESTS = st.lists(st.tuples(st.lists(st.integers(0, 259), min_size=1, max_size=12), st.integers(1, 8)),
                    min_size=1, max_size=4)  # (prompt, max_tokens) pairs
BAD_REQUESTS = st.one_of(
    st.tuples(st.sampled_from([[], [1.5, 2.0], [True], [260], [-3], "abc", 7, [1, None]]),
              st.just({"max_tokens": 2})),
    st.tuples(st.just([1, 2]), st.sampled_from([
        {"max_tokens": 0}, {"max_tokens": 2.5}, {"max_tokens": True}, {"top_p": 0.0}, {"top_k": 0},
        {"temperature": math.nan}, {"stop_ids": 5}, {"seed": "1"}, {"max_tokens": 600}])))


class EngineMachine(RuleBasedStateMachine):
    """LLMEngine under random knobs. A request is accepted exactly when the knobs can serve it
    (the test's own rule below), every accepted one that is not aborted finishes within a step
    bound with `generate`'s greedy tokens, and an idle engine holds no block."""

    @initialize(block_size=st.sampled_from([1, 2, 4, 8]), pool_tokens=st.integers(6, 40),
                max_num_seqs=st.integers(1, 4), budget=st.integers(1, 16), chunked=st.booleans(),
                caching=st.booleans(), mode=st.sampled_from(["recompute", "swap"]), first=REQUESTS)
    def build(self, block_size, pool_tokens, max_num_seqs, budget, chunked, caching, mode, first):
        num_blocks = -(-pool_tokens // block_size)  # tiny pools: some requests never fit, others preempt
        self.engine = llm_module.LLMEngine(
            TINY, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget, enable_chunked_prefill=chunked, enable_prefix_caching=caching,
            preemption_mode=mode)
        self.knobs = (block_size, num_blocks, budget, chunked)
        self.live, self.aborted, self.steps = {}, set(), 0  # live: request id -> (prompt, max_tokens)
        original = self.engine.scheduler.schedule

        def checked_schedule():
            out = original()
            assert out.num_tokens <= budget and len(out.seqs) <= max_num_seqs
            return out

        self.engine.scheduler.schedule = checked_schedule
        self.add_good(first)  # load from the start: most examples then preempt or refuse something

    def servable(self, prompt, max_tokens):
        block_size, num_blocks, budget, chunked = self.knobs
        fits_pool = -(-(len(prompt) + max_tokens) // block_size) <= num_blocks
        return fits_pool and (chunked or len(prompt) <= budget)

    @rule(requests=REQUESTS)
    def add_good(self, requests):
        """Well-formed requests; those the knobs can never serve must be refused at the call."""
        for prompt, max_tokens in requests:
            prompt = [7, 7, 7, 7] + prompt if len(prompt) % 3 == 0 else prompt  # shared prefixes
            params = llm_module.SamplingParams(max_tokens=max_tokens)
            if self.servable(prompt, max_tokens):
                self.live[self.engine.add_request(prompt, params)] = (prompt, max_tokens)
            else:
                with pytest.raises(llm_module.RequestError, match="num_blocks|max_num_batched_tokens"):
                    self.engine.add_request(prompt, params)

    @rule(bad=BAD_REQUESTS)
    def add_bad(self, bad):
        prompt, kwargs = bad
        before = len(self.engine.requests)
        with pytest.raises(llm_module.RequestError):
            self.engine.add_request(prompt, llm_module.SamplingParams(**kwargs))
        assert len(self.engine.requests) == before

    @rule(data=st.data())
    def abort(self, data):
        if not self.live:
            return
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.engine.abort(rid)
        assert self.engine.requests[rid].output.finished
        if self.engine.requests[rid].output.finish_reason == "abort":
            self.aborted.add(rid)

    @rule(n=st.integers(1, 4))
    def step(self, n):
        for _ in range(n):
            if self.engine.has_unfinished():
                self.engine.step()
                self.steps += 1

    @invariant()
    def consistent(self):
        if hasattr(self, "engine"):
            self.engine.block_manager.check_invariants()

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        engine = self.engine
        bound = 50 + 4 * sum(len(p) + m for p, m in self.live.values())  # generous; a hang fails fast
        drain(engine, max_steps=bound)
        for rid, (prompt, max_tokens) in self.live.items():
            out = engine.requests[rid].output
            assert out.finished and out.finish_reason in ("length", "abort"), (out.finish_reason, out.error)
            if rid not in self.aborted:
                assert out.finish_reason == "length" and out.token_ids == reference(prompt, max_tokens)
        engine.block_manager.check_invariants()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # no leak
        event(f"{'chunked' if self.knobs[3] else 'unchunked'}, "
              f"{'preempted' if engine.scheduler.num_preemptions else 'no preemption'}")
        event(f"served {len(self.live) - len(self.aborted)} requests")


EngineMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=8, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestEngineMachine = EngineMachine.TestCase
