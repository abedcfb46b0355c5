"""The model library: configs, layers, decoding cache and parameter accounting (CPU, fp64)."""

import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import rla_state
from rattention.cache import BLOCK, LocalCache, cache_bytes
from rattention.config import ModelConfig
from rattention.errors import ConfigError
from rattention.generate import EagerStep, generate, stepwise_logits
from rattention.model import LM, Attention, apply_rope, count_params

TINY = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=8, rla_chunk=8,
            dtype="float64")


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY, **kw})


def model(seed=0, **kw) -> LM:
    torch.manual_seed(seed)
    m = LM(tiny(**kw)).eval()
    # Non-default norm scales, so that both branches carry signal in every test.
    for name, p in m.named_parameters():
        if name.endswith(("norm_rla", "norm_swa")):
            p.data.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("field,value,expect", [
    ("window", -1, "model.window: must be >= 0"),
    ("n_kv_heads", 3, "model.n_heads: 4 must be a multiple of n_kv_heads (3)"),
    ("layout", "LLXG", "model.layout: letters allowed: L (local), G (global)"),
    ("kind", "mamba", "model.kind: Input should be 'full', 'swa' or 'rattention', got 'mamba'"),
    ("feature_map", "elu", "model.feature_map: Input should be 'sm2' or 'relu2'"),
    ("d_model", 48, "model.d_model: 48 must equal n_heads * head_dim (4 * 8 = 32)"),
    ("seq_len", 0, "model.seq_len: must be > 0, got 0"),
    ("windw", 3, "model.windw: unknown field"),
])
def test_bad_config_is_one_line(field, value, expect):
    with pytest.raises(ConfigError) as err:
        tiny(**{field: value})
    msg = str(err.value)
    assert msg.startswith(expect), msg
    assert "\n" not in msg and err.value.__cause__ is None


def test_layout_and_kinds():
    assert tiny(kind="rattention", n_layers=6).layer_kinds() == ["rattention"] * 3 + ["global"] + ["rattention"] * 2
    assert tiny(kind="full").layer_kinds() == ["global"] * 4
    assert tiny(kind="swa", layout="LG").layer_kinds() == ["swa", "global", "swa", "global"]


@pytest.mark.parametrize("kind", ["full", "swa", "rattention"])
@pytest.mark.parametrize("window", [0, 3, 16, 40])
def test_decoding_equals_parallel_forward(kind, window):
    m = model(kind=kind, window=window, qk_norm=window == 3, nope_global=window != 16)
    tokens = torch.randint(0, 61, (2, 30), generator=torch.Generator().manual_seed(window))
    ref = m(tokens)
    for static in (False, True):  # model(token, cache) over a growing cache; the static step over a reserved one
        assert (stepwise_logits(m, tokens, static=static) - ref).abs().max() < 1e-6
        assert (stepwise_logits(m, tokens, prefill=11, static=static) - ref).abs().max() < 1e-6


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_decoding_gqa(n_kv):
    m = model(kind="rattention", window=5, n_kv_heads=n_kv, feature_map="relu2")
    tokens = torch.randint(0, 61, (1, 21))
    assert (stepwise_logits(m, tokens, prefill=7) - m(tokens)).abs().max() < 1e-6
    assert (stepwise_logits(m, tokens, prefill=7, static=True) - m(tokens)).abs().max() < 1e-6


@pytest.mark.parametrize("layout", ["LG", "GLL", "L"])
def test_decoding_any_layout(layout):
    m = model(kind="rattention", window=4, layout=layout, n_layers=3, qk_norm=layout == "GLL")
    tokens = torch.randint(0, 61, (2, 15), generator=torch.Generator().manual_seed(3))
    ref = m(tokens)
    for static in (False, True):
        assert (stepwise_logits(m, tokens, prefill=6, static=static) - ref).abs().max() < 1e-6


def layer0_keys(m: LM, tokens: torch.Tensor):
    """Layer 0's raw keys, softmax-branch keys (QK-normed, RoPE'd) and values for ``tokens``, in parallel."""
    attn = m.blocks[0].attn
    _, k_raw, v = attn._project(m.blocks[0].attn_norm(m.embed(tokens)))
    return k_raw, attn._softmax_qk(k_raw, attn.k_norm, attn._rope(torch.arange(tokens.shape[1]))), v


@pytest.mark.parametrize("qk_norm", [False, True])
def test_static_step_across_ring_wraparound_and_past_window(qk_norm):
    """Prefill 3 tokens into a ring of 6 (w=5), then step 17 times: the ring fills, wraps around twice and
    every step past the window folds the leaving key (un-rotated, or from the raw ring with QK-norm) into S."""
    w, t_all = 5, 20
    m = model(kind="rattention", window=w, qk_norm=qk_norm)
    tokens = torch.randint(0, 61, (2, t_all), generator=torch.Generator().manual_seed(7))
    ref = m(tokens)
    k_raw, k, v = layer0_keys(m, tokens)
    cache = m.new_cache(2, capacity=t_all)
    out = [m(tokens[:, :3], cache, logits="last")]
    step = EagerStep(m, cache)
    ring: LocalCache = cache.layers[0]
    assert (ring.k_raw is not None) == qk_norm
    for t in range(3, t_all):
        out.append(step(tokens[:, t : t + 1]))
        assert cache.length == t + 1 and int(cache.pos) == t + 1
        assert (out[-1][:, 0] - ref[:, t]).abs().max() < 1e-6, t
        assert (ring.k[:, :, t % (w + 1)] - k[:, :, t]).abs().max() < 1e-12  # stored RoPE'd, once
        assert (ring.state - rla_state(k_raw, v, t + 1 - (w + 1))).abs().max() < 1e-10, t  # S: keys <= t-w-1
    assert (out[0][:, 0] - ref[:, 2]).abs().max() < 1e-6
    assert ring.state.abs().max() > 0


def test_unrotate_inverts_rope():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    attn = model(kind="rattention").blocks[0].attn
    cos, sin = attn._rope(torch.tensor([0, 7, 100, 513, 40000]))
    from kernels.decode.naive import unrotate
    assert (unrotate(apply_rope(x, cos, sin), cos, sin) - x).abs().max() < 1e-12
    assert (apply_rope(x, cos, sin) - x).abs().max() > 0.1


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("capacity", [None, 20])
def test_prefill_leaves_the_same_cache_as_stepping(qk_norm, capacity):
    m = model(kind="rattention", window=4, qk_norm=qk_norm)
    tokens = torch.randint(0, 61, (2, 17))
    a, b = m.new_cache(2, capacity), m.new_cache(2, capacity)
    m(tokens, a, logits="last")
    for t in range(tokens.shape[1]):
        m(tokens[:, t : t + 1], b)
    assert a.length == b.length == 17 and int(a.pos) == int(b.pos) == 17
    for la, lb in zip(a.layers, b.layers, strict=True):
        for x, y in zip(la.tensors(), lb.tensors(), strict=True):
            assert x.shape == y.shape and torch.allclose(x, y, atol=1e-12)


@pytest.mark.parametrize("kind,qk_norm", [("full", False), ("swa", False), ("rattention", False),
                                          ("rattention", True)])
def test_cache_bytes_match_real_tensors_and_local_stay_flat(kind, qk_norm):
    cfg = tiny(kind=kind, window=6, qk_norm=qk_norm)
    m = LM(cfg).eval()
    cache, reserved = m.new_cache(3), m.new_cache(3, capacity=25)
    assert reserved.capacity == BLOCK  # reserved in whole blocks
    sizes = []
    for t in range(20):
        token = torch.randint(0, 61, (3, 1))
        m(token, cache)
        m(token, reserved)
        assert cache.nbytes() == cache_bytes(cfg, t + 1, batch=3)  # growing: holds exactly the length
        assert reserved.nbytes() == cache_bytes(cfg, BLOCK, batch=3)  # reserved: holds its capacity
        sizes.append(sum(x.nbytes for layer, k in zip(cache.layers, cfg.layer_kinds(), strict=True)
                         if k != "global" for x in layer.tensors()))
    assert len(set(sizes)) == 1  # local layers: flat in L
    if kind == "full":
        assert cache_bytes(cfg, 40) == 2 * cache_bytes(cfg, 20)
    else:
        assert cache_bytes(cfg, 4000) < cache_bytes(tiny(kind="full"), 4000) / 3


def test_rattention_state_is_counted():
    base = cache_bytes(tiny(kind="swa", window=6), 100)
    # 3 local layers, each with an fp64 state of Hkv * 2D * D
    assert cache_bytes(tiny(kind="rattention", window=6), 100) - base == 3 * 1 * 16 * 8 * 8
    # with QK-norm (not invertible) each local layer also keeps its w+1 raw keys
    qk = cache_bytes(tiny(kind="rattention", window=6, qk_norm=True), 100) - base
    assert qk == 3 * (1 * 16 * 8 + 7 * 1 * 8) * 8  # elements (state + raw ring) times 8 bytes


def test_last_only_logits():
    m = model(kind="rattention", window=3)
    tokens = torch.randint(0, 61, (2, 13))
    full = m(tokens)
    last = m(tokens, logits="last")
    assert last.shape == (2, 1, 61) and (last - full[:, -1:]).abs().max() < 1e-12
    cache = m.new_cache(2, capacity=14)
    assert (m(tokens, cache, logits="last") - full[:, -1:]).abs().max() < 1e-12
    nxt = torch.randint(0, 61, (2, 1))
    assert (m(nxt, cache, logits="last")[:, 0] - m(torch.cat([tokens, nxt], 1))[:, -1]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="logits: expected 'all' or 'last', got 'first'"):
        m(tokens, logits="first")


def test_reserved_cache_refuses_past_its_capacity():
    m = model(kind="full")
    cache = m.new_cache(1, capacity=BLOCK - 3)
    assert cache.capacity == BLOCK
    m(torch.randint(0, 61, (1, BLOCK - 1)), cache)
    m(torch.randint(0, 61, (1, 1)), cache)
    with pytest.raises(ValueError, match=f"capacity: the cache holds {BLOCK} positions, decoding needs {BLOCK + 1}"):
        m(torch.randint(0, 61, (1, 1)), cache)
    with pytest.raises(ValueError, match=f"capacity: the cache holds {BLOCK} positions, decoding needs {BLOCK + 2}"):
        m(torch.randint(0, 61, (1, BLOCK + 2)), m.new_cache(1, capacity=5))


def test_window_at_least_t_gives_normed_swa_plus_zero_rla():
    t = 12
    q, k, qr, kr = (torch.randn(1, 4, t, 8, dtype=torch.float64) for _ in range(4))
    v = torch.randn(1, 2, t, 8, dtype=torch.float64)
    k, kr = k[:, :2], kr[:, :2]
    ws, wr = torch.rand(4, 8, dtype=torch.float64), torch.rand(4, 8, dtype=torch.float64)
    for w in (t - 1, t, 100):
        a = kernels.rattention(q, k, qr, kr, v, w, ws, wr, chunk=5)
        b = kernels.normed_attention(q, k, v, w, ws)
        assert (a - b).abs().max() < 1e-12
    # Whole model: RAttention at w >= T-1 equals SWA with the output-norm ablation, same weights.
    ra = model(kind="rattention", window=t)
    sw = LM(tiny(kind="swa", window=t, swa_output_norm=True)).eval()
    missing, unexpected = sw.load_state_dict(ra.state_dict(), strict=False)
    assert not missing and all(n.endswith("norm_rla") for n in unexpected)
    tokens = torch.randint(0, 61, (2, t))
    assert (ra(tokens) - sw(tokens)).abs().max() < 1e-12
    longer = torch.randint(0, 61, (2, t + 5))  # now keys fall outside the window: the branches differ
    assert (ra(longer) - sw(longer)).abs().max() > 1e-3


def test_full_kind_has_rope_on_every_layer_and_local_global_g_layers_none():
    """The full baseline is a standard Transformer (an all-NoPE stack has no position information); the
    G layers of the local-global kinds stay NoPE, as in the paper. Each is a recorded config field."""
    assert tiny(kind="full").nope_global is False and tiny(kind="swa").nope_global is True
    assert all(b.attn.use_rope for b in LM(tiny(kind="full")).blocks)
    kinds = LM(tiny(kind="rattention", layout="LG", n_layers=2)).blocks
    assert kinds[0].attn.use_rope and not kinds[1].attn.use_rope


def test_full_kind_is_plain_causal_attention():
    m = model(kind="full", nope_global=True)
    attn = m.blocks[0].attn
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    q, k, v = attn._project(x)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert torch.allclose(attn(x), attn.wo(ref.transpose(1, 2).reshape(2, 9, 32)), atol=1e-12)


def test_param_count_and_rattention_adds_only_two_scales():
    for kw in (dict(kind="full"), dict(kind="swa"), dict(kind="rattention", qk_norm=True),
               dict(kind="swa", swa_output_norm=True, tie_embeddings=False)):
        cfg = tiny(**kw)
        assert LM(cfg).num_params() == count_params(cfg)
        assert LM(cfg).num_params(exclude_embedding=True) == count_params(cfg, exclude_embedding=True)
    assert count_params(tiny(kind="rattention")) - count_params(tiny(kind="swa")) == 3 * 2 * 4 * 8


def test_rla_norm_init_is_a_config_field():
    paper = LM(tiny(kind="rattention"))  # the default is the paper's start, 1.0
    assert torch.equal(paper.blocks[0].attn.norm_rla, torch.ones(4, 8, dtype=torch.float64))
    assert torch.equal(paper.blocks[0].attn.norm_swa, torch.ones(4, 8, dtype=torch.float64))
    assert LM(tiny(kind="rattention", rla_norm_init=0.0)).blocks[0].attn.norm_rla.abs().max() == 0


def test_generate_greedy_matches_argmax():
    m = model(kind="rattention", window=3)
    prompt = torch.randint(0, 61, (2, 5))
    out = generate(m, prompt, max_new_tokens=8)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], prompt)
    logits = m(out[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), out[:, 5:])
    sampled = generate(m, prompt, 4, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 9)
    assert torch.equal(generate(m, prompt, 0), prompt)


def test_generate_computes_only_the_logits_it_samples():
    """Prefill of a P-token prompt projects one position to the vocabulary, never (B, P, V)."""
    m = model(kind="swa", window=3)
    rows = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(tuple(out.shape)))
    generate(m, torch.randint(0, 61, (2, 9)), max_new_tokens=4)
    assert rows == [(2, 1, 61)] * 4  # prefill's last position, then three steps (the 4th token needs none)
    with pytest.raises(ValueError, match="cuda_graph: needs the model and cache on a CUDA device"):
        generate(m, torch.randint(0, 61, (2, 9)), 2, cuda_graph=True)


def test_float32_forward_backward_runs_and_is_finite():
    torch.manual_seed(0)
    m = LM(tiny(kind="rattention", dtype="float32", window=4, rla_norm_init=1.0))
    tokens = torch.randint(0, 61, (2, 20))
    loss = F.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("s", [7, 513, 4 * BLOCK, 4097, 1031])
def test_split_decode_attention_equals_plain_softmax(s):
    """kernels.attention_decode's split-K form (key blocks that divide S, or a tail) against one softmax
    over all the valid keys."""
    from kernels.ops import key_block
    assert key_block(513) == 513 and key_block(4097) == 241 and key_block(4 * BLOCK) == BLOCK
    assert key_block(1031) == BLOCK  # a prime: no divisor of at least BLOCK/8, so a tail
    g = torch.Generator().manual_seed(s)
    q = torch.randn(2, 6, 1, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, s, 8, dtype=torch.float64, generator=g) for _ in range(2))
    valid = torch.arange(s) <= s - 3
    kg = k.repeat_interleave(3, dim=1)  # 6 query heads on 2 kv heads
    scores = (q @ kg.transpose(-1, -2) / 8**0.5).masked_fill(~valid, float("-inf"))
    ref = torch.softmax(scores, dim=-1) @ v.repeat_interleave(3, dim=1)
    assert (kernels.attention_decode(q, k, v, valid) - ref).abs().max() < 1e-12


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("kind,qk_norm,phi,n_kv", [("rattention", False, "sm2", 2), ("rattention", True, "relu2", 1),
                                                   ("swa", True, "sm2", 2)])
def test_fused_local_decode_equals_parallel_forward(kind, qk_norm, phi, n_kv, monkeypatch):
    """The fused local-layer step (kernels.local_decode's Triton path, forced on under the interpreter) through the
    model: past the window (folds, un-rotated or raw leaving keys) it equals the parallel forward, and the
    torch step."""
    pytest.importorskip("triton")
    m = model(kind=kind, window=6, qk_norm=qk_norm, feature_map=phi, n_kv_heads=n_kv, head_dim=16, d_model=64,
              n_layers=2, layout="LG", dtype="float32", swa_output_norm=kind == "swa")
    tokens = torch.randint(0, 61, (2, 17), generator=torch.Generator().manual_seed(4))
    ref = m(tokens)
    monkeypatch.setattr(Attention, "fused_decode", False)
    torch_path = stepwise_logits(m, tokens, prefill=3, static=True)
    monkeypatch.setattr(Attention, "fused_decode", True)
    fused = stepwise_logits(m, tokens, prefill=3, static=True)
    assert (fused - ref).abs().max() < 1e-5
    assert (fused - torch_path).abs().max() < 1e-5


def test_decode_keeps_the_torch_path_by_default():
    """The fused step is opt-in (kernels.ops.FUSED_DECODE, until a GPU run has timed it) and needs CUDA: the
    model tests above hold the torch path."""
    from kernels import ops

    assert Attention.fused_decode is None and not ops.FUSED_DECODE
    assert not ops.fused_decode_serves(torch.zeros(1, 2, 16))
