"""§4 PagedAttention: block manager, copy-on-write, prefix caching, paged attention.

- the block manager: a hand-worked case, exhaustion, and a hypothesis state machine that runs
  random allocate / append / fork / free / evict sequences against a model of the cache contents;
- paged_attention against naive_attention for random lengths, block sizes, GQA ratios, shuffled
  physical blocks and multi-token queries;
- the tiny model generating through PagedKVCache exactly as through ContiguousKVCache,
  including after a fork (copy-on-write) and with prefix caching;
- the analyses' numbers behave as the cost model says.
"""

import random
from collections import deque

import pytest
import torch
from conftest import load_lesson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

llm_module = load_lesson()


def snapshot(bm):
    """Everything the manager owns, to check that a failed call changed nothing."""
    seqs = {i: (list(s.token_ids), list(s.block_table), list(s.block_hashes), s.num_slots,
                s.num_cached_tokens) for i, s in bm.live.items()}
    stats = (bm.hit_blocks, bm.missed_blocks, bm.prompt_tokens, bm.cached_prompt_tokens,
             bm.evictions, bm.cow_copies)
    return (list(bm.ref_count), list(bm.free_blocks), list(bm.cached_blocks), dict(bm.hash_to_block),
            list(bm.block_hash), seqs, stats)


# ---------------------------------------------------------------------------------------------
# Block manager: hand-worked cases
# ---------------------------------------------------------------------------------------------
def test_hand_worked_fork_and_copy_on_write(llm):
    """4 blocks of 2 tokens, prefix caching off: the tables worked out by hand."""
    bm = llm.BlockManager(4, block_size=2, enable_prefix_caching=False)
    a = llm.SequenceState(0, [1, 2, 3])
    assert bm.allocate(a) == 0 and a.block_table == [0, 1]  # [1 2][3 _]
    computed(bm, a)  # its prefill ran
    b = llm.SequenceState(1)
    bm.fork(a, b)
    assert b.token_ids == [1, 2, 3] and b.block_table == [0, 1] and bm.ref_count == [2, 2, 0, 0]
    a.token_ids.append(4)  # position 3 goes to block 1, which b shares: copy it first
    assert bm.append_slot(a) == (2 * 2 + 1, (1, 2))
    assert a.block_table == [0, 2] and bm.ref_count == [2, 1, 1, 0]
    b.token_ids.append(5)  # block 1 is b's alone now: written in place
    assert bm.append_slot(b) == (1 * 2 + 1, None)
    a.token_ids.append(6)  # position 4 starts a new block
    assert bm.append_slot(a) == (3 * 2 + 0, None)
    assert a.block_table == [0, 2, 3] and bm.num_free_blocks == 0 and bm.cow_copies == 1
    bm.check_invariants()
    bm.free(a)
    assert bm.ref_count == [1, 1, 0, 0] and list(bm.free_blocks) == [3, 2] and bm.num_cached_blocks == 0
    bm.free(b)
    assert bm.num_free_blocks == 4 and bm.ref_count == [0, 0, 0, 0]
    bm.check_invariants()


def computed(bm, *seqs):
    """What a forward step does for the block manager: every slotted token is now computed, and
    the full blocks are committed (published in the prefix cache)."""
    for seq in seqs:
        seq.num_computed_tokens = seq.num_slots
        bm.commit(seq)


def test_hand_worked_prefix_cache_and_eviction(llm):
    """Same pool with prefix caching on: cached blocks are revived, then evicted LRU."""
    bm = llm.BlockManager(4, block_size=2)
    a, b = llm.SequenceState(0, [1, 2, 3]), llm.SequenceState(1)
    bm.allocate(a)
    computed(bm, a)
    bm.fork(a, b)
    for seq, tok in ((a, 4), (b, 5), (a, 6)):
        seq.token_ids.append(tok)
        bm.append_slot(seq)
    assert a.block_table == [0, 2, 3] and b.block_table == [0, 1]
    computed(bm, a, b)
    b.token_ids.append(7)  # needs a fifth block
    before = snapshot(bm)
    with pytest.raises(llm.OutOfBlocksError):
        bm.append_slot(b)
    assert snapshot(bm) == before
    bm.free(a)  # block 3 (partial) is free; block 2 = [3 4] after [1 2] stays findable
    assert list(bm.free_blocks) == [3] and list(bm.cached_blocks) == [2] and bm.ref_count == [1, 1, 0, 0]
    assert bm.append_slot(b) == (3 * 2, None)  # takes the free block, keeps the cached one
    computed(bm, b)
    c = llm.SequenceState(2, [1, 2, 3, 4, 9])  # would hit blocks 0 and 2, needs one more
    before = snapshot(bm)
    assert not bm.can_allocate(c)
    with pytest.raises(llm.OutOfBlocksError):
        bm.allocate(c)
    assert snapshot(bm) == before and c.block_table == []
    bm.free(b)  # 3 -> free; 1 = [3 5] then 0 = [1 2] join the cache (tail first)
    assert list(bm.free_blocks) == [3] and list(bm.cached_blocks) == [2, 1, 0]
    assert bm.allocate(c) == 4 and c.block_table == [0, 2, 3] and list(bm.cached_blocks) == [1]
    assert (bm.hit_blocks, bm.missed_blocks) == (2, 1) and bm.hit_rate == pytest.approx(2 / 3)
    d = llm.SequenceState(3, [7, 7])
    bm.allocate(d)  # no free block left: evict the least recently used cached block
    assert d.block_table == [1] and bm.evictions == 1 and bm.num_cached_blocks == 0
    bm.check_invariants()


def test_last_prompt_token_is_never_a_cache_hit(llm):
    """A prompt that is all cached still computes its last token (its logits start generation)."""
    bm = llm.BlockManager(8, block_size=2)
    first = llm.SequenceState(0, [1, 2, 3, 4])
    bm.allocate(first)
    computed(bm, first)
    bm.free(first)
    assert list(bm.cached_blocks) == [1, 0]
    again = llm.SequenceState(1, [1, 2, 3, 4])
    assert bm.allocate(again) == 2  # [1 2] hits; [3 4] holds the last token: a fresh twin block
    assert again.block_table == [0, 2] and bm.block_hash[2] is None and list(bm.cached_blocks) == [1]
    bm.check_invariants()


def test_exhaustion_leaves_state_unchanged(llm):
    bm = llm.BlockManager(3, block_size=4)
    big = llm.SequenceState(0, list(range(13)))  # 4 blocks
    before = snapshot(bm)
    assert not bm.can_allocate(big)
    with pytest.raises(llm.OutOfBlocksError, match="needs 4 blocks"):
        bm.allocate(big)
    assert snapshot(bm) == before and big.block_table == [] and big.seq_id not in bm.live
    seq = llm.SequenceState(1, list(range(12)))
    bm.allocate(seq)
    seq.token_ids.append(99)
    before = snapshot(bm)
    assert not bm.can_append(seq)
    with pytest.raises(llm.OutOfBlocksError):
        bm.append_slot(seq)
    assert snapshot(bm) == before


def test_misuse_raises_named_errors(llm):
    bm = llm.BlockManager(8, block_size=2)
    seq = llm.SequenceState(0, [1, 2, 3])
    with pytest.raises(llm.InvalidArgumentError):
        bm.append_slot(seq)  # never allocated
    with pytest.raises(llm.InvalidArgumentError):
        bm.allocate(llm.SequenceState(5))  # no tokens
    bm.allocate(seq)
    with pytest.raises(llm.InvalidArgumentError):
        bm.allocate(seq)  # twice
    with pytest.raises(llm.InvalidArgumentError, match="append the token first"):
        bm.append_slot(seq)  # no new token
    seq.token_ids += [4, 5]
    seq.num_computed_tokens = 3  # the prompt's step ran
    cache = llm.PagedKVCache(llm.ModelConfig.from_name("tiny"), 8, 2)
    with pytest.raises(llm.InvalidArgumentError, match="append_slot"):
        cache.metadata([seq], [2])  # tokens 4 and 5 have no slots yet
    assert bm.append_slot(seq) == (1 * 2 + 1, None) and bm.append_slot(seq) == (2 * 2, None)
    with pytest.raises(llm.InvalidArgumentError):
        bm.free(llm.SequenceState(9))
    with pytest.raises(llm.InvalidArgumentError):
        llm.BlockManager(0)


def test_block_hash_is_chained(llm):
    h = llm.block_hash
    assert h(None, [1, 2]) == h(None, [1, 2])
    assert h(None, [1, 2]) != h(None, [2, 1])
    assert h(h(None, [1, 2]), [3, 4]) != h(h(None, [9, 9]), [3, 4])  # same tokens, other prefix


# ---------------------------------------------------------------------------------------------
# Block manager: random operation sequences (hypothesis state machine)
# ---------------------------------------------------------------------------------------------
class BlockManagerMachine(RuleBasedStateMachine):
    """Random allocate / append / compute / truncate / fork / free against a model of what each
    cache slot holds.

    `content[slot]` is the prefix whose last token's K/V the slot holds: written only by a
    `compute` step (a forward), never by reserving a slot. A prefix hit must find the right
    content, so a block published before its K/V is computed (then freed, or rolled back) is
    caught; a write must never land in a shared block; a copy-on-write copies content like
    PagedKVCache.copy_block.
    """

    @initialize(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 3, 4]),
                caching=st.booleans())
    def setup(self, num_blocks, block_size, caching):
        self.bm = llm_module.BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.bs = block_size
        self.content = [None] * (num_blocks * block_size)
        self.seqs, self.next_id = {}, 0

    def slot(self, seq, pos):
        return seq.block_table[pos // self.bs] * self.bs + pos % self.bs

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=10))
    def allocate(self, tokens):
        seq = llm_module.SequenceState(self.next_id, tokens)
        self.next_id += 1
        if self.bm.can_allocate(seq):
            cached = self.bm.allocate(seq)
            assert seq.num_computed_tokens == cached
            for pos in range(cached):  # a prefix hit must hold exactly this prefix's K/V
                assert self.content[self.slot(seq, pos)] == tuple(tokens[:pos + 1])
            self.seqs[seq.seq_id] = seq
        else:
            before = snapshot(self.bm)
            with pytest.raises(llm_module.OutOfBlocksError):
                self.bm.allocate(seq)
            assert snapshot(self.bm) == before and seq.block_table == []

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), tokens=st.lists(st.integers(0, 2), min_size=1, max_size=3))
    def append(self, data, tokens):
        """Append 1-3 tokens (3: a speculative step), then reserve their slots one by one."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        seq.token_ids += tokens
        while seq.num_slots < seq.num_tokens:
            if not self.bm.can_append(seq):
                before = snapshot(self.bm)
                with pytest.raises(llm_module.OutOfBlocksError):
                    self.bm.append_slot(seq)
                assert snapshot(self.bm) == before
                del seq.token_ids[seq.num_slots:]  # the step does not run: drop its tokens
                return
            pos = seq.num_slots
            slot, cow = self.bm.append_slot(seq)
            if cow is not None:
                src, dst = cow
                assert src != dst and seq.block_table[-1] == dst
                bs = self.bs
                self.content[dst * bs:(dst + 1) * bs] = self.content[src * bs:(src + 1) * bs]
            assert slot == self.slot(seq, pos)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def compute(self, data):
        """A forward step: the sequence's slotted, uncomputed tokens get their K/V; commit."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        for pos in range(seq.num_computed_tokens, seq.num_slots):
            slot = self.slot(seq, pos)
            assert self.bm.ref_count[slot // self.bs] == 1, "wrote into a shared block"
            self.content[slot] = tuple(seq.token_ids[:pos + 1])
        seq.num_computed_tokens = seq.num_slots
        self.bm.commit(seq)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        """Roll back (rejected speculative tokens, §6)."""
        seq = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        keep = data.draw(st.integers(0, seq.num_tokens))
        self.bm.truncate(seq, keep)
        assert seq.num_tokens == keep and seq.num_slots <= keep and seq.num_computed_tokens <= keep

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = self.seqs[data.draw(st.sampled_from(sorted(self.seqs)))]
        child = llm_module.SequenceState(self.next_id)
        if parent.num_computed_tokens < parent.num_slots:  # forks happen after a step
            with pytest.raises(llm_module.InvalidArgumentError, match="after the step"):
                self.bm.fork(parent, child)
            return
        self.next_id += 1
        self.bm.fork(parent, child)
        assert child.block_table == parent.block_table
        self.seqs[child.seq_id] = child

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        """Finish, or preempt by recompute: possibly before its tokens were ever computed."""
        self.bm.free(self.seqs.pop(data.draw(st.sampled_from(sorted(self.seqs)))))

    @invariant()
    def consistent(self):
        if not hasattr(self, "bm"):
            return
        self.bm.check_invariants()
        assert self.bm.num_free_blocks + self.bm.num_used_blocks == self.bm.num_blocks
        for seq in self.seqs.values():  # every computed token's slot holds that token's K/V
            for pos in range(seq.num_computed_tokens):
                assert self.content[self.slot(seq, pos)] == tuple(seq.token_ids[:pos + 1])

    def teardown(self):
        if not hasattr(self, "bm"):
            return
        for seq in list(self.seqs.values()):
            self.bm.free(seq)
        self.bm.check_invariants()
        assert self.bm.num_free_blocks == self.bm.num_blocks and not any(self.bm.ref_count)


BlockManagerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestBlockManagerMachine = BlockManagerMachine.TestCase


# ---------------------------------------------------------------------------------------------
# paged_attention against naive_attention
# ---------------------------------------------------------------------------------------------
def paged_problem(llm, context_lens, query_lens, block_size, Hkv, g, D=8, seed=0, extra_blocks=3):
    """Random q and per-sequence K/V, the K/V scattered into shuffled blocks of a pool."""
    gen = torch.Generator().manual_seed(seed)
    rnd = random.Random(seed)
    nbs = [-(-T // block_size) for T in context_lens]
    num_blocks = sum(nbs) + extra_blocks
    physical = list(range(num_blocks))
    rnd.shuffle(physical)
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)  # garbage everywhere
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=gen)
    width = max(nbs) + 2
    tables, ks, vs = [], [], []
    for T, nb in zip(context_lens, nbs):
        blocks, physical = physical[:nb], physical[nb:]
        k, v = torch.randn(T, Hkv, D, generator=gen), torch.randn(T, Hkv, D, generator=gen)
        for t in range(T):
            k_cache[blocks[t // block_size], t % block_size] = k[t]
            v_cache[blocks[t // block_size], t % block_size] = v[t]
        tables.append(blocks + [-1] * (width - nb))
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(query_lens), Hkv * g, D, generator=gen)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return q, k_cache, v_cache, torch.tensor(tables), starts, ks, vs


def check_against_naive(llm, context_lens, query_lens, block_size, Hkv, g, seed=0):
    q, k_cache, v_cache, tables, starts, ks, vs = paged_problem(
        llm, context_lens, query_lens, block_size, Hkv, g, seed=seed)
    out = llm.paged_attention(q, k_cache, v_cache, tables, context_lens, starts)
    for s, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
        expected = llm.naive_attention(q[a:b], ks[s], vs[s])
        torch.testing.assert_close(out[a:b], expected, atol=1e-5, rtol=1e-5)


@st.composite
def attention_cases(draw):
    S = draw(st.integers(1, 4))
    context_lens = draw(st.lists(st.integers(1, 40), min_size=S, max_size=S))
    if draw(st.booleans()):  # same number of new tokens everywhere: the batched path
        tq = draw(st.integers(1, min(context_lens)))
        query_lens = [tq] * S
    else:
        query_lens = [draw(st.integers(1, T)) for T in context_lens]
    return (context_lens, query_lens, draw(st.sampled_from([1, 2, 3, 4, 16])),
            draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2, 3])), draw(st.integers(0, 99)))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_cases())
def test_paged_attention_matches_naive(llm, case):
    check_against_naive(llm, *case)


@pytest.mark.parametrize("context_lens, query_lens", [
    ([1, 7, 16, 33], [1, 1, 1, 1]),  # decode: ragged contexts, one batched call
    ([16, 32], [16, 16]),  # prefill of whole blocks, no padding
    ([20, 9, 40], [5, 5, 5]),  # chunked prefill, uniform chunk
    ([20, 9, 40], [20, 1, 7]),  # a mixed step: prefill, decode, prefill chunk
])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_cases(llm, context_lens, query_lens, block_size):
    check_against_naive(llm, context_lens, query_lens, block_size, Hkv=2, g=3)


def test_gather_kv_follows_the_table(llm):
    cache = torch.arange(4 * 2).view(4, 2, 1, 1).float()  # block b holds 2b, 2b+1
    table = torch.tensor([3, 0, 2, -1])
    assert llm.gather_kv(cache, table, 5).flatten().tolist() == [6, 7, 0, 1, 4]


# ---------------------------------------------------------------------------------------------
# The tiny model on the paged cache
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(llm):
    return llm.build_model("tiny", seed=0, device="cpu")


def contiguous_generate(llm, model, prompt, n_new, forced=()):
    """Greedy generation on the contiguous cache (the module's `generate`), after `forced` tokens."""
    return list(forced) + llm.generate(model, list(prompt) + list(forced), n_new - len(forced))


def paged_step(model, cache, seqs, query_lens, bm=None):
    """One packed forward over the next query_lens[s] uncomputed tokens of seqs[s]; logits (S, V).
    With `bm`, the step's full blocks are then committed (published for prefix caching)."""
    logits = load_lesson().paged_step(model, cache, list(seqs), list(query_lens))  # the module's own
    for seq in seqs if bm is not None else ():
        bm.commit(seq)
    return logits


def append_tokens(bm, cache, seqs, tokens):
    """Append one token to each sequence, reserving its slot (and copying on write)."""
    copies = 0
    for seq, tok in zip(seqs, tokens):
        seq.token_ids.append(tok)
        _, cow = bm.append_slot(seq)
        if cow is not None:
            cache.copy_block(*cow)
            copies += 1
    return copies


def shuffled_manager(llm, num_blocks, block_size, caching=True, seed=0):
    bm = llm.BlockManager(num_blocks, block_size, enable_prefix_caching=caching)
    order = list(bm.free_blocks)
    random.Random(seed).shuffle(order)  # physical placement must not matter
    bm.free_blocks = deque(order)
    return bm


def test_ragged_batch_generates_like_contiguous(llm, tiny):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 260, (n,), generator=gen).tolist() for n in (5, 11, 17)]
    n_new, bs = 12, 4
    bm = shuffled_manager(llm, 64, bs)
    cache = llm.PagedKVCache(tiny.cfg, 64, bs)
    seqs = [llm.SequenceState(i, list(p)) for i, p in enumerate(prompts)]
    for seq in seqs:
        bm.allocate(seq)
    logits = paged_step(tiny, cache, seqs, [len(p) for p in prompts])  # one ragged prefill step
    generated = [[] for _ in seqs]
    for _ in range(n_new):
        nxt = logits.argmax(-1).tolist()
        for out, tok in zip(generated, nxt):
            out.append(tok)
        append_tokens(bm, cache, seqs, nxt)
        logits = paged_step(tiny, cache, seqs, [1] * len(seqs))  # uniform decode step
    for prompt, out in zip(prompts, generated):
        assert out == contiguous_generate(llm, tiny, prompt, n_new)
    bm.check_invariants()


def test_fork_with_copy_on_write_generates_like_contiguous(llm, tiny):
    """Parent and child share a partly filled block; the child takes the second-best token."""
    prompt = [7, 42, 99, 3, 17, 250]  # 6 tokens, blocks of 4: the last block is half full
    bs, n_new = 4, 10
    bm = shuffled_manager(llm, 32, bs, seed=3)
    cache = llm.PagedKVCache(tiny.cfg, 32, bs)
    parent = llm.SequenceState(0, list(prompt))
    bm.allocate(parent)
    logits = paged_step(tiny, cache, [parent], [len(prompt)])
    for _ in range(3):  # three greedy tokens before the fork
        append_tokens(bm, cache, [parent], [int(logits[0].argmax())])
        logits = paged_step(tiny, cache, [parent], [1])
    child = llm.SequenceState(1)
    bm.fork(parent, child)
    assert bm.ref_count[parent.block_table[-1]] == 2
    best, second = logits[0].topk(2).indices.tolist()
    assert append_tokens(bm, cache, [parent, child], [best, second]) == 1  # one copy, one in place
    assert parent.block_table[0] == child.block_table[0] and parent.block_table[-1] != child.block_table[-1]
    for _ in range(n_new):
        logits = paged_step(tiny, cache, [parent, child], [1, 1])
        append_tokens(bm, cache, [parent, child], logits.argmax(-1).tolist())
    history = parent.token_ids[len(prompt):len(prompt) + 3]
    for seq, choice in ((parent, best), (child, second)):
        expected = contiguous_generate(llm, tiny, prompt, 4 + n_new, history + [choice])
        assert seq.token_ids[len(prompt):] == expected
    bm.check_invariants()


@pytest.mark.parametrize("bs", [2, 4, 16])
def test_prefix_caching_gives_identical_outputs(llm, tiny, bs):
    gen = torch.Generator().manual_seed(2)
    system = torch.randint(0, 260, (37,), generator=gen).tolist()
    users = [torch.randint(0, 260, (n,), generator=gen).tolist() for n in (5, 9, 1)]
    prompts = [system + u for u in users] + [system + users[0]]  # the last one repeats the first
    n_new = 6
    results = {}
    for caching in (False, True):
        bm = shuffled_manager(llm, 96, bs, caching=caching)
        cache = llm.PagedKVCache(tiny.cfg, 96, bs)
        live, outs, skipped = [], [], []
        for i, prompt in enumerate(prompts):
            seq = llm.SequenceState(i, list(prompt))
            cached = bm.allocate(seq)
            skipped.append(cached)
            logits = paged_step(tiny, cache, [seq], [seq.num_tokens - cached], bm)  # prefill the rest
            for _ in range(n_new):
                append_tokens(bm, cache, [seq], [int(logits[0].argmax())])
                logits = paged_step(tiny, cache, [seq], [1], bm)
            outs.append(seq.token_ids[len(prompt):])
            live.append(seq)
            if i == 0:
                bm.free(live.pop())  # the first request finishes: its blocks stay cached
        bm.check_invariants()
        results[caching] = outs, skipped
    outs_off, skipped_off = results[False]
    outs_on, skipped_on = results[True]
    assert outs_on == outs_off
    assert outs_on[1] == contiguous_generate(llm, tiny, prompts[1], n_new)
    assert skipped_off == [0, 0, 0, 0]
    assert skipped_on[1] == skipped_on[2] == len(system) // bs * bs
    assert skipped_on[3] == (len(prompts[3]) - 1) // bs * bs  # all but the block of the last token


def test_paged_cache_write_then_attend_matches_contiguous(llm):
    """The two caches' verbs agree on one ragged step (prefill + decode sequences)."""
    cfg = llm.ModelConfig.from_name("tiny")
    bs = 4
    bm = shuffled_manager(llm, 16, bs, caching=False)
    paged = llm.PagedKVCache(cfg, 16, bs)
    contiguous = llm.ContiguousKVCache(cfg, 2, 32)
    seqs = [llm.SequenceState(0, list(range(9))), llm.SequenceState(1, list(range(3)))]
    for seq in seqs:
        bm.allocate(seq)
    gen = torch.Generator().manual_seed(0)
    N, H, Hkv, D = 12, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = (torch.randn(N, h, D, generator=gen) for h in (H, Hkv, Hkv))
    _, meta_p = paged.metadata(seqs, [9, 3])
    _, meta_c = contiguous.metadata_at([0, 1], [0, 0], [9, 3])
    paged.write(0, k, v, meta_p)
    contiguous.write(0, k, v, meta_c)
    torch.testing.assert_close(paged.attend(0, q, meta_p), contiguous.attend(0, q, meta_c))


# ---------------------------------------------------------------------------------------------
# Analyses
# ---------------------------------------------------------------------------------------------
def test_request_lengths_have_the_published_means(llm):
    P, O = llm.sample_request_lengths(40000, "sharegpt", seed=0)
    assert P.mean() == pytest.approx(161.31, rel=0.1) and O.mean() == pytest.approx(337.99, rel=0.1)
    assert (P >= 1).all() and (O >= 1).all() and (P + O <= 2048).all()


def test_kv_utilization_follows_the_cost_model(llm):
    rows = {r["scheme"]: r for r in llm.analyze_kv_utilization(num_requests=300, seed=0)}
    held = lambda name: rows[name]["tokens held %"]  # noqa: E731
    for r in rows.values():
        parts = r["tokens held %"] + r["reserved for later %"] + r["never used %"]
        assert parts == pytest.approx(100)
    assert held("paged, block size 1") == pytest.approx(100)
    assert rows["contiguous: exact final length (Orca Oracle)"]["never used %"] == 0
    order = ["contiguous: reserve max length (Orca Max)", "contiguous: next power of 2 (Orca Pow2)",
             "contiguous: exact final length (Orca Oracle)", "paged, block size 64",
             "paged, block size 32", "paged, block size 16", "paged, block size 8", "paged, block size 1"]
    assert [held(n) for n in order] == sorted(held(n) for n in order)
    assert rows["contiguous: reserve max length (Orca Max)"]["seqs in 12 GiB"] == int(
        12 * 2**30 / 819200 / 2048)  # Llama-2-13B: 800 KiB per token, 2,048 reserved: 7 whole sequences


def test_sharing_saves_memory_and_beams_save_more(llm):
    rows = llm.analyze_sharing(datasets=("alpaca",), widths=(2, 4), num_requests=15, seed=0)
    saving = {(r["decoding"], r["n"]): r["saving %"] for r in rows}
    assert all(0 < s < 100 for s in saving.values())
    assert saving["beam search", 4] > saving["parallel sampling", 4]
    assert saving["parallel sampling", 4] > saving["parallel sampling", 2]


def test_prefix_caching_analysis(llm):
    rows = llm.analyze_prefix_caching(num_requests=60, seed=0)
    assert rows[0]["prefix caching"] == "off" and rows[0]["block hit rate %"] == 0
    assert all(r["block hit rate %"] > 50 for r in rows[1:4])
    assert rows[-1]["evictions"] > 0 and rows[-1]["block hit rate %"] < rows[-2]["block hit rate %"]


def test_speed_analysis_checks_equality(llm):
    rows = llm.measure_paged_attention_speed(cases=((2, 40),), device="cpu", repeat=1)
    assert rows[0]["max abs diff"] < 1e-5 and rows[0]["paged ms"] > 0


def test_plot_kv_utilization(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSON_PLOT_DIR", str(tmp_path))
    plot = llm.plot_kv_utilization(llm.analyze_kv_utilization(num_requests=50, seed=0))
    assert plot.path.exists() and plot.path.parent == tmp_path


# ---------------------------------------------------------------------------------------------
# paged_generate, on the tiny model and on SmolLM2
# ---------------------------------------------------------------------------------------------
def test_paged_generate_equals_contiguous_tiny(llm, tiny):
    system = list(range(40, 75))
    prompts = [system + [1, 2, 3], system + [9], [5, 6, 7, 8, 9, 10, 11]]
    ref = [llm.generate(tiny, p, 10) for p in prompts]
    for caching in (False, True):
        outs, stats = llm.paged_generate(tiny, prompts, 10, block_size=4, enable_prefix_caching=caching)
        assert outs == ref
        assert stats["prompt tokens skipped"] == ((35 // 4) * 4 if caching else 0)  # prompt 2 hits 8 blocks


def test_paged_generate_out_of_blocks(llm, tiny):
    with pytest.raises(llm.OutOfBlocksError):
        llm.paged_generate(tiny, [[1] * 20], 4, block_size=4, num_blocks=3)


def test_paged_generate_equals_contiguous_real_model(llm, smollm2_gguf):
    rows = llm.measure_paged_generation(smollm2_gguf, device="cpu", max_new_tokens=12)
    assert [r["identical tokens"] for r in rows] == [True, True, True]
    contiguous, off, on = rows
    assert off["prompt tokens computed"] == contiguous["prompt tokens computed"]
    assert on["prompt tokens computed"] < off["prompt tokens computed"]  # shared system prompt
    assert off["KV held, fp32 (KiB)"] <= contiguous["KV held, fp32 (KiB)"]


def test_paged_generate_zero_tokens_and_bad_analysis_input(llm, tiny):
    assert llm.paged_generate(tiny, [[1, 2], [3]], 0)[0] == [[], []]
    with pytest.raises(llm.InvalidArgumentError):
        llm.analyze_kv_utilization(num_requests=10, block_sizes=(0,))
    with pytest.raises(llm.InvalidArgumentError):
        llm.sample_request_lengths(-1)
    with pytest.raises(llm.InvalidArgumentError):
        llm.analyze_sharing(widths=(0,), num_requests=2)


def test_paged_attention_defaults_to_one_query_per_sequence(llm):
    """No query_start: a decode step, one query per sequence; equal to the per-sequence loop."""
    q, k_cache, v_cache, tables, starts, ks, vs = paged_problem(llm, [5, 19, 2], [1, 1, 1], 4, 2, 3)
    out = llm.paged_attention(q, k_cache, v_cache, tables, [5, 19, 2])
    torch.testing.assert_close(out, llm.paged_attention_naive(q, k_cache, v_cache, tables, [5, 19, 2]))
    with pytest.raises(llm.InvalidArgumentError, match="query offsets"):
        llm.paged_attention(q, k_cache, v_cache, tables, [5, 19, 2], [0, 1, 3])


def test_mixed_step_is_at_most_two_attention_calls(llm):
    """A step of decodes and prefill chunks is planned as two padded groups, never a per-sequence loop."""
    meta = llm.AttentionMetadata([0, 1, 8, 9, 12], [10, 7, 30, 3])
    groups = llm.attention_groups(meta, "cpu")
    assert [g.seqs for g in groups] == [[0, 2], [1, 3]]
    assert [(g.Tq, g.Tk) for g in groups] == [(1, 30), (7, 7)]


def test_a_block_is_findable_only_after_its_kv_is_computed(llm):
    """Regression (issue #9): freeing a sequence before any forward ran (as a preemption does)
    must not leave its blocks findable; they would be read as cached K/V never written."""
    bm = llm.BlockManager(8, block_size=2)
    a = llm.SequenceState(0, [1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.free(a)  # preempted before its prefill ran
    b = llm.SequenceState(1, [1, 2, 3, 4, 9])
    assert bm.allocate(b) == 0 and b.num_computed_tokens == 0
    computed(bm, b)  # its prefill ran: now [1 2] and [3 4] are findable
    c = llm.SequenceState(2, [1, 2, 3, 4, 7])
    assert bm.allocate(c) == 4 and c.block_table[:2] == b.block_table[:2]
    bm.check_invariants()


def test_truncate_rolls_back_blocks_and_hashes(llm):
    bm = llm.BlockManager(8, block_size=2)
    seq = llm.SequenceState(0, [1, 2, 3, 4, 5, 6, 7])
    bm.allocate(seq)
    computed(bm, seq)
    assert len(seq.block_hashes) == 3 and bm.num_used_blocks == 4
    bm.truncate(seq, 3)  # keep [1 2] [3 _]: blocks 3 and 4 are released, their hashes dropped
    assert seq.token_ids == [1, 2, 3] and seq.num_slots == seq.num_computed_tokens == 3
    assert len(seq.block_table) == 2 and len(seq.block_hashes) == 1 and bm.num_used_blocks == 2
    assert bm.block_hash[seq.block_table[1]] is None  # [3 4] will be overwritten: not findable
    assert len(bm.hash_to_block) == 1 and bm.num_cached_blocks == 0
    seq.token_ids.append(8)
    assert bm.append_slot(seq) == (seq.block_table[1] * 2 + 1, None)
    with pytest.raises(llm.InvalidArgumentError):
        bm.truncate(seq, 9)
    bm.check_invariants()


def test_paged_attention_refuses_what_it_cannot_read(llm):
    """A context longer than its table row holds, a context of no tokens, fewer table rows than
    sequences, more queries than context, or a block id outside the cache where the context
    reads: named errors from `paged_attention` and its reference, not a shape error or zeros."""
    q, k_cache, v_cache, tables, starts, ks, vs = paged_problem(llm, [5, 19, 2], [1, 1, 1], 4, 2, 3)
    width = tables.shape[1]  # 19 tokens in blocks of 4: 5 blocks, rows padded to 7
    holey = tables.clone()
    holey[1, 2] = -1  # inside sequence 1's 19 tokens
    outside = tables.clone()
    outside[0, 0] = k_cache.shape[0]
    cases = [([5, 4 * width + 1, 2], tables, None, "holds"),  # longer than the row
             ([5, 0, 2], tables, [0, 1, 1, 2], "at least one token"),  # no context at all
             ([5, 19, 2], tables[:2], None, "rows for 3 sequences"),
             ([5, 19, 2], tables, [0, 6, 6, 7], "6 queries but a context of 5"),
             ([5, 19, 2], holey, None, "outside the cache"),
             ([5, 19, 2], outside, None, "outside the cache")]
    for lens, table, query_start, match in cases:
        qq = q if query_start is None else torch.randn(query_start[-1], *q.shape[1:])
        for fn in (llm.paged_attention, llm.paged_attention_naive):
            with pytest.raises(llm.InvalidArgumentError, match=match):
                fn(qq, k_cache, v_cache, table, lens, query_start)
