"""The reference merge is two per-head RMSNorms and their sum, in fp64."""

from fp64 import rand, rel

from kernels.merge.naive import merge_naive


def test_merge_is_per_head_rmsnorm():
    o1, o2 = rand(1, 2, 5, 4), rand(1, 2, 5, 4, seed=1)
    w1, w2 = rand(2, 4, seed=2), rand(2, 4, seed=3)
    out = merge_naive(o1, o2, w1, w2, eps=0.0)
    expect = sum(o / o.pow(2).mean(-1, keepdim=True).sqrt() * w[None, :, None, :] for o, w in ((o1, w1), (o2, w2)))
    assert rel(out, expect) < 1e-14
