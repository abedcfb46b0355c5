"""Synthetic long-context tasks as token-id sequences with an answer mask (no Ray, no tokenizer needed).

Each generator returns a :class:`TaskSample` of exactly ``seq_len`` tokens. ``mask[t]`` is True where
``tokens[t]`` is an answer, to be predicted from ``tokens[:t]`` (in (inputs, targets) terms: score
``targets[t-1]`` where ``mask[t]``). ``source_pos[i]`` is the earlier position that holds the same
token as answer ``answer_pos[i]``: the evidence the model must recall. Distances are controlled by
the parameters, so a task can put every piece of evidence outside a sliding window ``w`` (evidence
at ``s`` is outside the window of the position ``a - 1`` that predicts answer ``a`` when
``a - 1 - s > w``) and can be generated at lengths past the training length.

Token ids come from :class:`TaskVocab`, which splits a vocabulary (minus reserved ids such as EOS)
into four marker ids and disjoint key, value and filler ranges.

- ``mqar``: Zoology-style multi-query associative recall, ``k1 v1 k2 v2 ... [gap] kq vq ...``.
- ``niah``: RULER-style needle in a haystack; single, multi-key (distractor needles), multi-value
  (one key, several values) and multi-query (several keys asked) are parameter settings.
- ``passkey``: a digit passkey hidden in a repetitive haystack.
- ``vt``: variable tracking, chains ``X1 = v; X2 = X1; ...``; the query names all variables of a chain.
- ``copy``: a random span, then (after ``gap`` filler tokens) the same span again; the copy is the
  answers. Every answer's evidence lies exactly ``span + gap`` tokens before the position predicting
  it, so a stack of local layers with window ``w`` has a minimal window known by construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rattention.errors import ConfigError


@dataclass(frozen=True)
class TaskVocab:
    """Token ids for the tasks: 4 markers, then keys, values and filler in disjoint ranges."""

    vocab_size: int
    reserved: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.vocab_size - len(set(self.reserved)) < 4 + 3 * 10:
            raise ConfigError(f"vocab_size: tasks need at least {34 + len(self.reserved)} ids, got {self.vocab_size}")

    @property
    def _pool(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.vocab_size), np.asarray(self.reserved, dtype=np.int64))

    @property
    def markers(self) -> dict[str, int]:
        """``needle``, ``query``, ``answer``, ``assign``: structure tokens never used as content."""
        p = self._pool
        return {"needle": int(p[0]), "query": int(p[1]), "answer": int(p[2]), "assign": int(p[3])}

    def _third(self, i: int) -> np.ndarray:
        rest = self._pool[4:]
        q = len(rest) // 3
        return rest[i * q : (i + 1) * q] if i < 2 else rest[2 * q :]

    @property
    def keys(self) -> np.ndarray:
        return self._third(0)

    @property
    def values(self) -> np.ndarray:
        return self._third(1)

    @property
    def filler(self) -> np.ndarray:
        return self._third(2)


@dataclass
class TaskSample:
    """One task instance: tokens, answer mask, and where each answer's evidence sits."""

    tokens: np.ndarray  # int64 (seq_len,)
    mask: np.ndarray  # bool (seq_len,), True at answer tokens
    answer_pos: np.ndarray  # int64, == np.flatnonzero(mask)
    source_pos: np.ndarray  # int64, same length: evidence position of each answer token
    meta: dict[str, Any] = field(default_factory=dict)

    def min_distance(self) -> int:
        """Smallest ``answer - 1 - source``: evidence is outside window w iff this exceeds w."""
        return int((self.answer_pos - 1 - self.source_pos).min())


class _Builder:
    """Appends segments, tracking answer and source positions."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.n = 0
        self.answers: list[int] = []
        self.sources: list[int] = []

    def add(self, ids: Sequence[int] | np.ndarray) -> int:
        arr = np.asarray(ids, dtype=np.int64).ravel()
        start = self.n
        self.parts.append(arr)
        self.n += len(arr)
        return start

    def answer(self, ids: np.ndarray, sources: Sequence[int]) -> None:
        start = self.add(ids)
        self.answers.extend(range(start, start + len(ids)))
        self.sources.extend(sources)

    def build(self, seq_len: int, meta: dict[str, Any]) -> TaskSample:
        tokens = np.concatenate(self.parts) if self.parts else np.zeros(0, np.int64)
        assert len(tokens) == seq_len, (len(tokens), seq_len)
        mask = np.zeros(seq_len, dtype=bool)
        answers = np.asarray(self.answers, dtype=np.int64)
        mask[answers] = True
        order = np.argsort(answers)
        return TaskSample(tokens, mask, answers[order], np.asarray(self.sources, np.int64)[order], meta)


def _filler(rng: np.random.Generator, vocab: TaskVocab, n: int, haystack: str | np.ndarray) -> np.ndarray:
    """``n`` haystack tokens: random filler ids, a repeated fixed phrase, or a slice of real text."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if isinstance(haystack, np.ndarray):
        if len(haystack) == 0:
            raise ConfigError("haystack: the token array is empty")
        start = int(rng.integers(len(haystack)))
        return np.resize(np.roll(np.asarray(haystack, np.int64), -start), n)
    if haystack == "noise":
        return rng.choice(vocab.filler, size=n)
    if haystack == "repeat":  # RULER's "The grass is green. The sky is blue..." as a fixed phrase
        phrase = vocab.filler[: min(16, len(vocab.filler))]
        return np.resize(phrase, n).astype(np.int64)
    raise ConfigError(f"haystack: must be 'noise', 'repeat' or a token array, got {haystack!r}")


def _need(name: str, seq_len: int, needed: int) -> None:
    if seq_len < needed:
        raise ConfigError(f"seq_len: {name} with these parameters needs at least {needed} tokens, got {seq_len}")


def mqar(
    rng: np.random.Generator,
    vocab: TaskVocab,
    seq_len: int,
    num_pairs: int = 8,
    num_queries: int | None = None,
    gap: int = 0,
) -> TaskSample:
    """``[filler] k1 v1 ... kN vN [gap filler tokens] kq1 vq1 ...``: recall each queried key's value.

    Every answer's source is at least ``gap + 1`` tokens before the position predicting it, so
    ``gap >= w`` puts all evidence outside a window ``w``. Leading filler pads to ``seq_len``.
    """
    num_queries = num_pairs if num_queries is None else num_queries
    if not 1 <= num_queries <= num_pairs:
        raise ConfigError(f"num_queries: must be in [1, num_pairs={num_pairs}], got {num_queries}")
    if num_pairs > min(len(vocab.keys), len(vocab.values)):
        raise ConfigError(f"num_pairs: at most {min(len(vocab.keys), len(vocab.values))} for this vocab")
    _need("mqar", seq_len, 2 * num_pairs + gap + 2 * num_queries)
    keys = rng.choice(vocab.keys, size=num_pairs, replace=False)
    vals = rng.choice(vocab.values, size=num_pairs, replace=True)
    b = _Builder()
    b.add(_filler(rng, vocab, seq_len - 2 * num_pairs - gap - 2 * num_queries, "noise"))
    kv_start = b.add(np.stack([keys, vals], 1))
    b.add(_filler(rng, vocab, gap, "noise"))
    for i in rng.choice(num_pairs, size=num_queries, replace=False):
        b.add([keys[i]])
        b.answer(np.asarray([vals[i]]), [kv_start + 2 * int(i) + 1])
    return b.build(seq_len, {"task": "mqar", "num_pairs": num_pairs, "num_queries": num_queries, "gap": gap})


def _depths(rng: np.random.Generator, depth: float | Sequence[float] | None, n: int) -> list[float]:
    if depth is None:
        return sorted(float(x) for x in rng.uniform(0, 1, size=n))
    ds = [float(depth)] * n if isinstance(depth, int | float) else [float(x) for x in depth]
    if len(ds) != n or not all(0.0 <= d <= 1.0 for d in ds):
        raise ConfigError(f"depth: need {n} values in [0, 1], got {depth!r}")
    return ds


def _insert(
    rng: np.random.Generator,
    vocab: TaskVocab,
    haystack_len: int,
    items: list[np.ndarray],
    depths: list[float],
    haystack: str | np.ndarray,
) -> tuple[np.ndarray, list[int]]:
    """Place ``items`` into a haystack at the given depths; return the context and item starts."""
    hay = _filler(rng, vocab, haystack_len, haystack)
    cuts = [int(round(d * haystack_len)) for d in depths]
    order = sorted(range(len(items)), key=lambda i: (cuts[i], i))
    parts, starts, pos, prev = [], [0] * len(items), 0, 0
    for i in order:
        parts.append(hay[prev : cuts[i]])
        pos += cuts[i] - prev
        prev = cuts[i]
        starts[i] = pos
        parts.append(items[i])
        pos += len(items[i])
    parts.append(hay[prev:])
    return np.concatenate(parts), starts


def niah(
    rng: np.random.Generator,
    vocab: TaskVocab,
    seq_len: int,
    num_keys: int = 1,
    num_values: int = 1,
    num_queries: int = 1,
    depth: float | Sequence[float] | None = None,
    key_len: int = 2,
    value_len: int = 3,
    haystack: str | np.ndarray = "noise",
) -> TaskSample:
    """Needles ``NEEDLE key ASSIGN value`` in a haystack, then ``QUERY key ANSWER values...``.

    ``num_keys`` > 1 is multi-key (the others are distractors), ``num_values`` > 1 multi-value
    (the same key with several values, all to be recalled in order), ``num_queries`` > 1
    multi-query. ``depth`` is a fraction of the haystack per needle (``num_keys * num_values``
    values, or one for all; random when None).
    """
    if not 1 <= num_queries <= num_keys:
        raise ConfigError(f"num_queries: must be in [1, num_keys={num_keys}], got {num_queries}")
    needle_len = 2 + key_len + value_len
    n_needles = num_keys * num_values
    query_len = num_queries * (2 + key_len + num_values * value_len)
    _need("niah", seq_len, n_needles * needle_len + query_len)
    keys = [rng.choice(vocab.keys, size=key_len, replace=True) for _ in range(num_keys)]
    while len({k.tobytes() for k in keys}) < num_keys:  # distinct keys
        keys = [rng.choice(vocab.keys, size=key_len, replace=True) for _ in range(num_keys)]
    values = [[rng.choice(vocab.values, size=value_len) for _ in range(num_values)] for _ in range(num_keys)]
    m = vocab.markers
    needles, owners = [], []
    for k in range(num_keys):
        for v in range(num_values):
            needles.append(np.concatenate([[m["needle"]], keys[k], [m["assign"]], values[k][v]]))
            owners.append((k, v))
    depths = _depths(rng, depth, n_needles)
    ctx, starts = _insert(rng, vocab, seq_len - n_needles * needle_len - query_len, needles, depths, haystack)
    b = _Builder()
    b.add(ctx)
    value_at = {owner: starts[i] + 2 + key_len for i, owner in enumerate(owners)}
    for k in sorted(int(x) for x in rng.choice(num_keys, size=num_queries, replace=False)):
        b.add(np.concatenate([[m["query"]], keys[k], [m["answer"]]]))
        # values in the order their needles appear in the haystack
        vs = sorted(range(num_values), key=lambda v, k=k: value_at[(k, v)])
        for v in vs:
            b.answer(values[k][v], [value_at[(k, v)] + j for j in range(value_len)])
    meta = {"task": "niah", "num_keys": num_keys, "num_values": num_values, "num_queries": num_queries,
            "depths": depths, "key_len": key_len, "value_len": value_len}
    return b.build(seq_len, meta)


def passkey(
    rng: np.random.Generator,
    vocab: TaskVocab,
    seq_len: int,
    depth: float | None = None,
    passkey_len: int = 5,
) -> TaskSample:
    """A ``passkey_len``-digit passkey in a repetitive haystack; ``QUERY ANSWER digits`` at the end."""
    digits = vocab.values[:10]
    m = vocab.markers
    key = rng.choice(digits, size=passkey_len)
    needle = np.concatenate([[m["needle"], m["assign"]], key])
    query_len = 2 + passkey_len
    _need("passkey", seq_len, len(needle) + query_len)
    (d,) = _depths(rng, depth, 1)
    ctx, (start,) = _insert(rng, vocab, seq_len - len(needle) - query_len, [needle], [d], "repeat")
    b = _Builder()
    b.add(ctx)
    b.add([m["query"], m["answer"]])
    b.answer(key, [start + 2 + j for j in range(passkey_len)])
    return b.build(seq_len, {"task": "passkey", "depth": d, "passkey_len": passkey_len})


def variable_tracking(
    rng: np.random.Generator,
    vocab: TaskVocab,
    seq_len: int,
    num_chains: int = 1,
    num_hops: int = 4,
    depth: tuple[float, float] = (0.0, 1.0),
    haystack: str | np.ndarray = "noise",
) -> TaskSample:
    """Chains ``ASSIGN X1 v``, ``ASSIGN X2 X1``, ... spread over depths ``[lo, hi]`` of a haystack.

    The query ``QUERY v ANSWER`` asks for every variable of the first chain, in assignment order;
    each answer's source is that variable's own assignment. ``hi`` controls the nearest evidence.
    """
    lo, hi = depth
    if not 0.0 <= lo <= hi <= 1.0:
        raise ConfigError(f"depth: need 0 <= lo <= hi <= 1, got {depth!r}")
    if num_chains * num_hops > len(vocab.keys):
        raise ConfigError(f"num_chains x num_hops: at most {len(vocab.keys)} variables for this vocab")
    m = vocab.markers
    names = rng.choice(vocab.keys, size=(num_chains, num_hops), replace=False)
    vals = rng.choice(vocab.values, size=num_chains, replace=False)
    stmts, where = [], []
    for h in range(num_hops):  # hop-major order keeps each chain's assignments in sequence
        for c in range(num_chains):
            rhs = vals[c] if h == 0 else names[c, h - 1]
            stmts.append(np.asarray([m["assign"], names[c, h], rhs]))
            where.append((c, h))
    n = len(stmts)
    depths = [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]
    query_len = 3 + num_hops
    _need("vt", seq_len, 3 * n + query_len)
    ctx, starts = _insert(rng, vocab, seq_len - 3 * n - query_len, stmts, depths, haystack)
    b = _Builder()
    b.add(ctx)
    b.add([m["query"], vals[0], m["answer"]])
    name_at = {w: starts[i] + 1 for i, w in enumerate(where)}
    b.answer(names[0], [name_at[(0, h)] for h in range(num_hops)])
    return b.build(seq_len, {"task": "vt", "num_chains": num_chains, "num_hops": num_hops, "depth": [lo, hi]})


def copy(
    rng: np.random.Generator,
    vocab: TaskVocab,
    seq_len: int,
    span: int = 64,
    gap: int = 0,
) -> TaskSample:
    """``[filler] COPY a_1..a_L [gap filler] COPY a_1..a_L``: repeat a random span of ``span`` tokens.

    The span's ids are drawn from every non-marker id; the second copy is the answers. Answer ``a_i``'s
    source is ``a_i`` in the first copy, and the position predicting it holds ``a_{i-1}`` (``COPY`` for
    the first), whose earlier occurrence sits just before the source: an induction match reaching back
    exactly ``span + gap`` tokens (``min_distance``). One local layer of window ``w >= span + gap``
    (above a layer that marks each position with its previous token) copies; smaller windows need the
    evidence carried further by more layers or by RAttention's linear branch.
    """
    if span < 1:
        raise ConfigError(f"span: must be >= 1 token, got {span}")
    if gap < 0:
        raise ConfigError(f"gap: must be >= 0 filler tokens, got {gap}")
    _need("copy", seq_len, 2 * span + gap + 2)
    content = np.concatenate([vocab.keys, vocab.values, vocab.filler])
    a = rng.choice(content, size=span)
    mark = vocab.markers["needle"]
    b = _Builder()
    b.add(_filler(rng, vocab, seq_len - 2 * span - gap - 2, "noise"))
    first = b.add([mark]) + 1
    b.add(a)
    b.add(_filler(rng, vocab, gap, "noise"))
    b.add([mark])
    b.answer(a, [first + i for i in range(span)])
    return b.build(seq_len, {"task": "copy", "span": span, "gap": gap})


TASKS: dict[str, Callable[..., TaskSample]] = {
    "mqar": mqar,
    "niah": niah,
    "passkey": passkey,
    "vt": variable_tracking,
    "copy": copy,
}


def task_parameters(kind: str) -> list[str]:
    """The parameters a task takes besides the generator, vocabulary and length (``gap``, ``depth``...)."""
    import inspect

    return [p for p in inspect.signature(TASKS[kind]).parameters if p not in ("rng", "vocab", "seq_len")]


def generate(
    kind: str, vocab: TaskVocab, seq_len: int, seed: int, start: int, stop: int, **params: Any
) -> Iterator[TaskSample]:
    """Samples ``start..stop-1`` of a task; sample i depends only on (seed, i), so ranges can be
    generated in parallel and any one sample regenerated alone."""
    if kind not in TASKS:
        raise ConfigError(f"kind: must be one of {', '.join(TASKS)}, got {kind!r}")
    fn = TASKS[kind]
    for i in range(start, stop):
        yield fn(np.random.default_rng([seed, i]), vocab, seq_len, **params)
