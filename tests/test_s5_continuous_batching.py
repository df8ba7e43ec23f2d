"""§5 Continuous batching: the engine gives every request the tokens `generate` gives it alone
(greedy and seeded sampling; chunked prefill, prefix caching and preemption by recompute and by
swap on and off), the scheduler keeps its limits, and bad requests fail at the call."""

import pytest
from conftest import load_lesson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_engine_equals_generate_sampled_tiny(llm, tiny):
    params = [llm.SamplingParams(max_tokens=6, temperature=0.8, top_k=20, top_p=0.9, seed=i)
              for i in range(5)]
    reference = [llm.generate(tiny, p, 6, temperature=0.8, top_k=20, top_p=0.9, seed=i)
                 for i, p in enumerate(PROMPTS)]
    outs = llm.LLMEngine(tiny, max_num_seqs=3, max_num_batched_tokens=16).generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == reference


def test_static_baseline_equals_generate(llm, tiny):
    params = [llm.SamplingParams(max_tokens=n) for n in MAX_TOKENS]
    outs = llm.static_batch_generate(tiny, PROMPTS, params, batch_size=2)
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
    if not config["enable_chunked_prefill"]:
        config["max_num_batched_tokens"] = max(config["max_num_batched_tokens"], 40)
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
    rows = llm.demonstrate_continuous_batching(model="tiny", device="cpu", quick=True)
    assert all(r["same tokens as static"] for r in rows)
    assert rows[1]["occupancy %"] > rows[0]["occupancy %"]
    assert len(rows) == 2  # quick: outputs too short to preempt, so no small-pool runs
    assert (tmp_path / "s5_batching_timeline.png").exists() and "Takeaway" in capsys.readouterr().out


def test_small_pool_preempts_with_the_same_tokens(llm):
    sizes = {**llm._batching_sizes(quick=False), "preemption_modes": ("recompute", "swap")}
    rows, _ = llm.analyze_continuous_batching("tiny", "cpu", **sizes)
    assert [r["policy"].split(",")[-1].strip() for r in rows[2:]] == ["recompute", "swap"]
    assert all(r["same tokens as static"] for r in rows)
    assert all(r["preemptions"] > 0 for r in rows[2:])
