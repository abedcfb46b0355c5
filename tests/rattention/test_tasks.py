"""Synthetic tasks put their answers, and the answers' evidence, where the parameters say."""

from __future__ import annotations

import numpy as np
import pytest

from rattention.errors import ConfigError
from rattention.tasks import TaskSample, TaskVocab, copy, generate, mqar, niah, passkey, variable_tracking

V = TaskVocab(512, reserved=(0,))


def rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng([7, i])


def check(s: TaskSample, seq_len: int) -> None:
    """Shape, mask, and that every answer copies its source token; no reserved id is used."""
    assert s.tokens.shape == (seq_len,) and s.mask.shape == (seq_len,)
    assert np.array_equal(np.flatnonzero(s.mask), s.answer_pos)
    assert len(s.source_pos) == len(s.answer_pos) > 0
    assert (s.source_pos < s.answer_pos).all()
    assert np.array_equal(s.tokens[s.answer_pos], s.tokens[s.source_pos])
    assert (s.tokens != 0).all() and (s.tokens < V.vocab_size).all()


def test_vocab_ranges_are_disjoint_and_skip_reserved():
    v = TaskVocab(300, reserved=(299,))
    parts = [np.asarray(list(v.markers.values())), v.keys, v.values, v.filler]
    allids = np.concatenate(parts)
    assert len(np.unique(allids)) == len(allids) == 299 and 299 not in allids
    with pytest.raises(ConfigError, match="vocab_size"):
        TaskVocab(20)


@pytest.mark.parametrize("gap", [0, 64, 300])
def test_mqar_gap_puts_evidence_outside_the_window(gap):
    s = mqar(rng(), V, 512, num_pairs=16, num_queries=8, gap=gap)
    check(s, 512)
    assert s.mask.sum() == 8
    # the last pair's value is exactly gap + 1 tokens before the first query's key
    assert s.min_distance() >= gap + 1  # so a window w = gap never sees any evidence
    # the queried keys appear in the pair section right before their values
    for a, src in zip(s.answer_pos, s.source_pos, strict=True):
        assert s.tokens[a - 1] == s.tokens[src - 1]
    with pytest.raises(ConfigError, match="seq_len"):
        mqar(rng(), V, 40, num_pairs=16, gap=10)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # single
        dict(num_keys=4),  # multi-key: 3 distractors
        dict(num_keys=2, num_values=3),  # multi-value
        dict(num_keys=4, num_queries=4),  # multi-query
    ],
)
def test_niah_variants(kw):
    s = niah(rng(1), V, 2048, depth=0.25, **kw)
    check(s, 2048)
    n_ans = kw.get("num_queries", 1) * kw.get("num_values", 1) * 3
    assert s.mask.sum() == n_ans
    # every needle sits at a quarter of the haystack: far from the query at the end
    assert s.min_distance() > 0.7 * 2048 - 200
    assert (s.answer_pos >= 2048 - 60).all()


def test_niah_depth_controls_position():
    near = niah(rng(), V, 4096, depth=1.0)
    far = niah(rng(), V, 4096, depth=0.0)
    check(near, 4096)
    check(far, 4096)
    assert near.min_distance() < 16 and far.min_distance() > 4000
    s = niah(rng(), V, 1024, num_keys=3, depth=[0.1, 0.5, 0.9], num_queries=3)
    haystack = 1024 - 3 * 7 - 3 * 7
    value_starts = sorted(s.source_pos[::3].tolist())  # value_len 3: one start per needle
    for k, (d, start) in enumerate(zip([0.1, 0.5, 0.9], value_starts, strict=True)):
        assert start == round(d * haystack) + 7 * k + 4  # earlier needles, then NEEDLE key ASSIGN


def test_niah_with_real_text_haystack():
    text = np.arange(1, 200, dtype=np.int64)
    s = niah(rng(), V, 600, haystack=text, depth=0.5)
    check(s, 600)
    ctx = s.tokens[: s.source_pos.min() - 4]
    assert len(ctx) > 200 and np.all(np.diff(ctx) % 199 == 1)  # a consecutive (wrapping) slice of the text


def test_passkey_depth_and_length_beyond_training():
    for L in (256, 8192):
        s = passkey(rng(), V, L, depth=0.1, passkey_len=5)
        check(s, L)
        assert s.mask.sum() == 5 and s.min_distance() == L - 8 - round(0.1 * (L - 14))
        assert set(s.tokens[s.answer_pos].tolist()) <= set(V.values[:10].tolist())


def test_variable_tracking_chain():
    s = variable_tracking(rng(), V, 1024, num_chains=3, num_hops=4, depth=(0.0, 0.5))
    check(s, 1024)
    assert s.mask.sum() == 4
    m = V.markers
    # follow the chain from the queried value: each answer variable is assigned the previous one
    q = s.answer_pos[0] - 3
    assert s.tokens[q] == m["query"] and s.tokens[q + 2] == m["answer"]
    prev = s.tokens[q + 1]
    for src in s.source_pos:
        assert s.tokens[src - 1] == m["assign"] and s.tokens[src + 1] == prev
        prev = s.tokens[src]
    assert s.min_distance() > 0.5 * (1024 - 36 - 7) - 10


@pytest.mark.parametrize(("span", "gap"), [(1, 0), (32, 0), (20, 7)])
def test_copy_repeats_the_span_at_a_known_distance(span, gap):
    s = copy(rng(3), V, 100, span=span, gap=gap)
    check(s, 100)
    assert s.mask.sum() == span and s.answer_pos[-1] == 99  # the copy closes the sequence
    # every answer's evidence is exactly span + gap tokens before the position predicting it
    assert ((s.answer_pos - 1 - s.source_pos) == span + gap).all() and s.min_distance() == span + gap
    mark = V.markers["needle"]
    first, second = s.source_pos[0] - 1, s.answer_pos[0] - 1
    assert s.tokens[first] == s.tokens[second] == mark and second - first == span + gap + 1
    # the token before each answer occurs again just before that answer's source: the induction cue
    assert np.array_equal(s.tokens[s.answer_pos - 1], s.tokens[s.source_pos - 1])
    assert mark not in s.tokens[s.answer_pos]
    with pytest.raises(ConfigError, match="seq_len"):
        copy(rng(), V, 2 * span + gap + 1, span=span, gap=gap)
    with pytest.raises(ConfigError, match="span"):
        copy(rng(), V, 100, span=0)


def test_copy_spans_differ_between_samples_and_use_the_whole_vocab():
    samples = list(generate("copy", V, 130, seed=0, start=0, stop=200, span=64))
    spans = np.stack([s.tokens[s.answer_pos] for s in samples])
    assert len({r.tobytes() for r in spans}) == 200
    used = np.unique(spans)
    assert len(used) > 0.9 * (512 - 1 - 4)  # keys, values and filler ids, not only one range


def test_generate_is_indexable_and_deterministic():
    a = list(generate("mqar", V, 128, seed=3, start=0, stop=5, num_pairs=4))
    b = list(generate("mqar", V, 128, seed=3, start=2, stop=4, num_pairs=4))
    assert np.array_equal(a[2].tokens, b[0].tokens) and np.array_equal(a[3].mask, b[1].mask)
    assert not np.array_equal(a[0].tokens, a[1].tokens)
    with pytest.raises(ConfigError, match="kind"):
        next(generate("nope", V, 128, 0, 0, 1))
