"""`guidance.rectify` against the projection written out on flattened group vectors (float64)."""
import pytest
import torch

from geffect_kernels.geffect.groups import layer_of
from geffect_kernels.guidance import rectify, rectify_sharded


def expected(g, r, group):
    """Per group: concatenate the group's tensors, project where the dot is negative, split back."""
    out = {}
    for name_group in dict.fromkeys(group.values()):
        names = [n for n in g if group[n] == name_group]
        gv = torch.cat([g[n].double().reshape(-1) for n in names])
        rv = torch.cat([r[n].double().reshape(-1) for n in names])
        dot, norm = torch.dot(gv, rv), torch.dot(rv, rv)
        new = gv - dot / norm * rv if dot < 0 and norm > 0 else gv
        start = 0
        for n in names:
            k = g[n].numel()
            out[n] = new[start:start + k].reshape(g[n].shape)
            start += k
    return out


def grads(seed, zero_group=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (11, 5), "model.layers.0.mlp.up_proj.weight": (7, 5),
              "model.layers.0.input_layernorm.weight": (5,), "model.layers.1.self_attn.q_proj.weight": (5, 5),
              "model.layers.1.self_attn.q_proj.bias": (5,), "lm_head.weight": (11, 5)}
    g = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    r = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    if zero_group is not None:
        for n in r:
            if layer_of(n) == zero_group:
                r[n].zero_()
    return g, r


def group_dots(g, r, group):
    out = {}
    for n in g:
        out[group[n]] = out.get(group[n], 0.0) + float((g[n] * r[n]).sum())
    return out


@pytest.mark.parametrize("seed", range(6))
def test_rectify_matches_the_projection(seed):
    g, r = grads(seed, zero_group="layer.1" if seed % 2 else None)
    # mixed signs: a conflict in layer.0 and the head, agreement in the embedding (and layer.1 unless r is 0 there)
    dots = group_dots(g, r, {n: layer_of(n) for n in g})
    for n in g:
        want_negative = layer_of(n) in ("layer.0", "lm_head")
        if (dots[layer_of(n)] < 0) != want_negative:
            g[n] = -g[n]
    before = {n: t.clone() for n, t in g.items()}
    group = {n: layer_of(n) for n in g}
    signs = group_dots(g, r, group)
    assert any(v < 0 for v in signs.values()) and any(v > 0 for v in signs.values())
    got = rectify(g, r)
    want = expected(g, r, group)
    for n in g:
        torch.testing.assert_close(got[n], want[n], rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(g[n], before[n], rtol=0, atol=0)  # inputs untouched
    after = group_dots(got, r, group)
    for grp, dot in signs.items():
        if dot < 0:
            assert abs(after[grp]) < 1e-10  # the conflict is removed
        else:
            assert all(torch.equal(got[n], g[n]) for n in g if group[n] == grp)  # untouched


def test_zero_retain_gradient_leaves_the_group():
    g, r = grads(3, zero_group="layer.1")
    got = rectify(g, r)
    for n in g:
        if layer_of(n) == "layer.1":
            assert torch.equal(got[n], g[n])


def test_groups_mapping_callable_and_one_group():
    g, r = grads(4)
    one = rectify(g, r, {n: "all" for n in g})
    torch.testing.assert_close(one, expected(g, r, {n: "all" for n in g}), rtol=1e-13, atol=1e-14)
    per_param = rectify(g, r, lambda n: n)
    torch.testing.assert_close(per_param, expected(g, r, {n: n for n in g}), rtol=1e-13, atol=1e-14)


def test_float32_in_float32_out_computed_in_float64():
    g, r = grads(5)
    g32, r32 = {n: t.float() for n, t in g.items()}, {n: t.float() for n, t in r.items()}
    got = rectify(g32, r32, {n: "all" for n in g})
    want = expected({n: t.double() for n, t in g32.items()}, {n: t.double() for n, t in r32.items()},
                    {n: "all" for n in g})
    for n in g:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n], want[n].float(), rtol=1e-6, atol=1e-7)


def test_sharded_products_summed_once_equal_whole():
    g, r = grads(6)
    # split every tensor's rows over two "ranks"; the all-reduce sums the two ranks' products
    halves = [{n: t.reshape(t.shape[0], -1)[k::2] for n, t in d.items()} for d in (g, r) for k in (0, 1)]
    g0, g1, r0, r1 = halves
    from geffect_kernels.guidance.rectify import group_of, group_products
    other = group_products(g1, r1, group_of(list(g1)))[1]
    calls = []

    def all_reduce(t):
        calls.append(1)
        t += other

    got0, _ = rectify_sharded(g0, r0, all_reduce=all_reduce)
    assert len(calls) == 1
    want = rectify(g, r)
    for n in g:
        torch.testing.assert_close(got0[n], want[n].reshape(want[n].shape[0], -1)[0::2], rtol=1e-13, atol=1e-14)


def test_bad_input():
    g, r = grads(7)
    with pytest.raises(ValueError, match="different parameters"):
        rectify(g, {n: t for n, t in r.items() if "lm_head" not in n})
    with pytest.raises(ValueError, match="lm_head.weight"):
        rectify(g, {**r, "lm_head.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="no group"):
        rectify(g, r, {"lm_head.weight": "x"})
