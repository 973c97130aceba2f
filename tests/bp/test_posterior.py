"""BP marginals and log-evidence against brute-force enumeration of every tree (float64 reference)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hdiff.bp import log_evidence, posterior
from hdiff.ghm import GHM, to_tree_order

from ._reference import exact_posterior, invalid_string, make_evidence, onehot_evidence

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_matches_exact(ghm: GHM, ev: torch.Tensor, dtype: torch.dtype) -> None:
    """BP on ``ev`` cast to ``dtype`` equals enumeration: log-evidence to relative ``TOL`` (absolute
    below 1), every level's marginals to absolute ``TOL``."""
    tol = TOL[dtype]
    ex = exact_posterior(ghm, ev)
    res = posterior(ghm, ev.to(dtype), levels=True)
    B = ev.shape[0]
    assert res.log_evidence.dtype == dtype and res.leaf_marginals.dtype == dtype
    assert res.leaf_marginals.shape == (B, *ghm.leaf_shape, ghm.vocab_size)
    assert res.root_marginals.shape == (B, ghm.num_classes)
    le = res.log_evidence.double()
    assert torch.equal(torch.isfinite(le), torch.isfinite(ex.log_evidence))
    assert (le[~torch.isfinite(le)] == -math.inf).all()
    fin = torch.isfinite(ex.log_evidence)
    err = (le[fin] - ex.log_evidence[fin]).abs() / ex.log_evidence[fin].abs().clamp_min(1.0)
    assert bool((err <= tol).all()), f"log_evidence {le} vs exact {ex.log_evidence}"
    torch.testing.assert_close(log_evidence(ghm, ev.to(dtype)), res.log_evidence, rtol=0, atol=0)
    torch.testing.assert_close(res.leaf_marginals.double(), ex.leaf_marginals, rtol=0, atol=tol)
    torch.testing.assert_close(res.root_marginals.double(), ex.root_marginals, rtol=0, atol=tol)
    assert len(res.level_marginals) == ghm.depth + 1
    for level, (got, want) in enumerate(zip(res.level_marginals, ex.level_marginals)):
        assert got.shape == (B, *ghm.level_shape(level), ghm.symbols(level))
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol, msg=lambda m: f"level {level}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["soft", "hard", "mixed"])
def test_matches_enumeration(tiny_ghm, kind, dtype):
    assert_matches_exact(tiny_ghm, make_evidence(tiny_ghm, kind, batch=4, seed=11), dtype)


def test_levels_false_gives_same_leaves(tiny_ghm):
    ev = make_evidence(tiny_ghm, "mixed", batch=3, seed=1)
    a, b = posterior(tiny_ghm, ev), posterior(tiny_ghm, ev, levels=True)
    assert a.level_marginals is None
    torch.testing.assert_close(a.leaf_marginals, b.leaf_marginals, rtol=0, atol=0)
    torch.testing.assert_close(a.root_marginals, b.root_marginals, rtol=0, atol=0)
    torch.testing.assert_close(b.level_marginals[-1], b.leaf_marginals, rtol=0, atol=0)


# ------------------------------------------------------------------ random tiny GHMs (hypothesis)
def _configs(max_trees: int = 2500) -> list[tuple]:
    """Every small (family, sizes) whose number of complete trees is at most ``max_trees``."""
    out = []
    for s, layout in [(2, "sequence"), (3, "sequence"), (4, "image")]:
        for depth in (1, 2, 3):
            inner = (s**depth - 1) // (s - 1)  # nodes above the leaves, root included
            below = (s ** (depth + 1) - s) // (s - 1)  # nodes below the root
            for v in (2, 3, 4):
                for nc in range(1, v + 1):
                    for m in range(1, min(v ** (s - 1), 4) + 1):
                        if nc * m**inner <= max_trees:
                            out += [("rhm", v, m, s, depth, nc, layout, rp) for rp in ("uniform", "zipf")]
                    if nc * v**below <= max_trees:
                        out.append(("fac", v, 0, s, depth, nc, layout, None))
    return out


CONFIGS = _configs()
BY_KIND = {kind: [c for c in CONFIGS if (c[0], c[6]) == kind]
           for kind in [("rhm", "sequence"), ("rhm", "image"), ("fac", "sequence"), ("fac", "image")]}


@st.composite
def tiny_configs(draw) -> tuple:
    """A family and layout uniformly (factorized configs are few), then sizes within it."""
    return draw(st.sampled_from(BY_KIND[draw(st.sampled_from(sorted(BY_KIND)))]))


def _build(cfg: tuple, seed: int, concentration: float) -> GHM:
    family, v, m, s, depth, nc, layout, rule_probs = cfg
    if family == "rhm":
        return GHM.random_hierarchy(v, m, s, depth, num_classes=nc, layout=layout, rule_probs=rule_probs, seed=seed)
    return GHM.random_factorized(v, s, depth, num_classes=nc, layout=layout, concentration=concentration, seed=seed)


def test_config_space_covers_both_families_and_layouts():
    assert all(BY_KIND.values()) and sum(map(len, BY_KIND.values())) == len(CONFIGS)
    assert any(c[0] == "rhm" and c[6] == "image" and c[4] == 2 for c in CONFIGS)
    assert any(c[5] != c[1] for c in CONFIGS)  # num_classes != vocab_size


@settings(max_examples=100, deadline=None, derandomize=True)
@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), ev_seed=st.integers(0, 2**16),
       kind=st.sampled_from(["soft", "hard", "mixed"]), concentration=st.sampled_from([0.3, 1.0, 5.0]))
def test_random_tiny_ghms_match_enumeration(cfg, seed, ev_seed, kind, concentration):
    _check_random_case(cfg, seed, ev_seed, kind, concentration)


def _check_random_case(cfg: tuple, seed: int, ev_seed: int, kind: str, concentration: float) -> None:
    ghm = _build(cfg, seed, concentration)
    ev = make_evidence(ghm, kind, batch=3, seed=ev_seed)
    assert_matches_exact(ghm, ev, torch.float64)
    assert_matches_exact(ghm, ev, torch.float32)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, derandomize=True)
@given(cfg=tiny_configs(), seed=st.integers(0, 2**16), ev_seed=st.integers(0, 2**16),
       kind=st.sampled_from(["soft", "hard", "mixed"]), concentration=st.sampled_from([0.1, 0.3, 1.0, 5.0]))
def test_many_random_tiny_ghms_match_enumeration(cfg, seed, ev_seed, kind, concentration):
    _check_random_case(cfg, seed, ev_seed + 1, kind, concentration)


# ------------------------------------------------------------------------------ impossible evidence
def _impossible_batch(ghm: GHM) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows: soft, invalid string (hard), soft with one leaf all -inf, hard consistent. -> (ev, possible)."""
    soft = make_evidence(ghm, "soft", batch=1, seed=3)
    bad_string = onehot_evidence(invalid_string(ghm), ghm.vocab_size)
    dead_leaf = make_evidence(ghm, "soft", batch=1, seed=4)
    dead_leaf.view(-1, ghm.vocab_size)[ghm.num_leaves // 2] = -math.inf
    hard = make_evidence(ghm, "hard", batch=1, seed=5)
    return torch.cat([soft, bad_string, dead_leaf, hard]), torch.tensor([True, False, False, True])


IMPOSSIBLE_GHMS = ["rhm-v3m2s2L2", "rhm-zipf-v4m3s2L2", "fac-sparse", "mixed-ambiguous", "img-rhm-v3m2L2"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", IMPOSSIBLE_GHMS)
def test_impossible_evidence_is_minus_inf_with_uniform_marginals(tiny_ghms, name, dtype):
    ghm = tiny_ghms[name]()
    ev, possible = _impossible_batch(ghm)
    ev = ev.to(dtype)
    res = posterior(ghm, ev, levels=True)
    assert torch.equal(torch.isfinite(res.log_evidence), possible)
    assert (res.log_evidence[~possible] == -math.inf).all()
    assert not torch.isnan(res.log_evidence).any()
    for level, q in enumerate(res.level_marginals + [res.leaf_marginals, res.root_marginals]):
        assert not torch.isnan(q).any() and not torch.isinf(q).any()
        torch.testing.assert_close(q.sum(-1), torch.ones_like(q.sum(-1)), rtol=0, atol=1e-6)
        uniform = torch.full_like(q[~possible], 1.0 / q.shape[-1])
        torch.testing.assert_close(q[~possible], uniform, rtol=0, atol=0)
    # the possible rows are unaffected by the impossible ones in their batch
    # (to rounding: an impossible row may send a whole level through the log-space path)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    alone = posterior(ghm, ev[possible], levels=True)
    torch.testing.assert_close(res.log_evidence[possible], alone.log_evidence, rtol=tol, atol=tol)
    for got, want in zip(res.level_marginals, alone.level_marginals):
        torch.testing.assert_close(got[possible], want, rtol=0, atol=tol)
    assert_matches_exact(ghm, ev.double(), dtype)  # enumeration agrees on every row


@pytest.mark.parametrize("name", ["fac-v2s2L2", "img-fac-v3L1"])
def test_all_minus_inf_leaf_is_impossible_for_dense_factorized(tiny_ghms, name):
    ghm = tiny_ghms[name]()  # every string is possible here: only a fully excluded leaf is not
    ev = make_evidence(ghm, "soft", batch=2, seed=0)
    ev.view(2, -1, ghm.vocab_size)[1, -1] = -math.inf
    res = posterior(ghm, ev)
    assert torch.isfinite(res.log_evidence[0]) and res.log_evidence[1] == -math.inf
    assert torch.all(res.leaf_marginals[1] == 1.0 / ghm.vocab_size)
    assert not torch.isnan(res.leaf_marginals).any()


# ----------------------------------------------------------------------------- invariances
def test_per_leaf_constants_shift_only_the_log_evidence(tiny_ghm):
    ev = make_evidence(tiny_ghm, "mixed", batch=3, seed=2)
    gen = torch.Generator().manual_seed(0)
    const = 40 * torch.randn(3, *tiny_ghm.leaf_shape, 1, generator=gen, dtype=torch.float64)
    a, b = posterior(tiny_ghm, ev), posterior(tiny_ghm, ev + const)
    torch.testing.assert_close(b.log_evidence, a.log_evidence + const.flatten(1).sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(b.leaf_marginals, a.leaf_marginals, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.root_marginals, a.root_marginals, rtol=0, atol=1e-12)


def test_input_is_not_modified_and_noncontiguous_input_works(tiny_ghm):
    ev = make_evidence(tiny_ghm, "mixed", batch=4, seed=9)
    keep = ev.clone()
    strided = ev[::2]  # non-contiguous view
    res = posterior(tiny_ghm, strided, levels=True)
    log_evidence(tiny_ghm, ev.float())
    assert torch.equal(ev, keep)
    ref = posterior(tiny_ghm, strided.contiguous(), levels=True)
    torch.testing.assert_close(res.leaf_marginals, ref.leaf_marginals, rtol=0, atol=0)
    torch.testing.assert_close(res.log_evidence, ref.log_evidence, rtol=0, atol=0)


def test_repeated_calls_give_identical_results(tiny_ghm):
    ev = make_evidence(tiny_ghm, "soft", batch=2, seed=5).float()
    a, b = posterior(tiny_ghm, ev, levels=True), posterior(tiny_ghm, ev, levels=True)
    assert torch.equal(a.log_evidence, b.log_evidence)
    assert all(torch.equal(x, y) for x, y in zip(a.level_marginals, b.level_marginals))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_evidence_is_computed_in_float32(dtype):
    ghm = GHM.random_hierarchy(3, 2, 2, 2, seed=1)
    ev = make_evidence(ghm, "soft", batch=3, seed=0).to(dtype)
    res = posterior(ghm, ev)
    ref = posterior(ghm, ev.float())
    torch.testing.assert_close(res.leaf_marginals.float(), ref.leaf_marginals, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.log_evidence.float(), ref.log_evidence, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", ["rhm", "fac"])
def test_image_layout_equals_sequence_layout_on_tree_ordered_leaves(family):
    depth = 3  # 64 leaves: too many trees to enumerate, so compare the two layouts instead
    if family == "rhm":
        img = GHM.random_hierarchy(4, 3, 4, depth, num_classes=2, layout="image", rule_probs="zipf", seed=0)
    else:
        img = GHM.random_factorized(3, 4, depth, num_classes=2, layout="image", seed=0)
    seq = GHM(img.root_prior, img.kernels, layout="sequence")
    gen = torch.Generator().manual_seed(0)
    x = img.sample(3, generator=gen)
    ev_img = 2 * torch.nn.functional.one_hot(x, img.vocab_size).double() + torch.randn(
        *x.shape, img.vocab_size, generator=gen, dtype=torch.float64)
    ev_seq = to_tree_order(ev_img, "image", depth)
    assert ev_seq.shape == (3, 4**depth, img.vocab_size)
    a, b = posterior(img, ev_img, levels=True), posterior(seq, ev_seq, levels=True)
    torch.testing.assert_close(a.log_evidence, b.log_evidence, rtol=1e-12, atol=0)
    torch.testing.assert_close(a.root_marginals, b.root_marginals, rtol=0, atol=1e-12)
    torch.testing.assert_close(to_tree_order(a.leaf_marginals, "image", depth), b.leaf_marginals, rtol=0, atol=1e-12)
    for level in range(depth + 1):
        torch.testing.assert_close(to_tree_order(a.level_marginals[level], "image", level),
                                   b.level_marginals[level], rtol=0, atol=1e-12)
    torch.testing.assert_close(img.log_prob(x), seq.log_prob(to_tree_order(x, "image", depth)), rtol=1e-12, atol=0)


def test_empty_batch():
    ghm = GHM.random_hierarchy(3, 2, 2, 2, seed=1)
    res = posterior(ghm, torch.zeros(0, *ghm.leaf_shape, ghm.vocab_size))
    assert res.leaf_marginals.shape == (0, *ghm.leaf_shape, ghm.vocab_size)
    assert res.log_evidence.shape == (0,)
    assert ghm.log_prob(torch.zeros(0, *ghm.leaf_shape, dtype=torch.long)).shape == (0,)
