"""The BP U-Net (Mei 2024): with a GHM's weights its forward pass is BP, and its finite-width approximation converges.

Exactness criterion (docs/bp_unet.md): float32 leaf log-posteriors within 1e-4 of the BP oracle's
wherever the oracle's probability exceeds 1e-30 (below that float32 has no relative precision
left, in the oracle's own output too), probabilities within 1e-6 everywhere, and below 1e-6
where the oracle says 0.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hdiff.denoisers import BPDenoiser
from hdiff.bp import posterior, upward_messages
from hdiff.ghm import GHM, enumerate_strings, from_tree_order, to_tree_order
from hdiff.models.bp_unet import BPUNet, bp_unet_from_config
from hdiff.models.bp_unet_width import PairwiseLSE, fit_nonlinearity, tree_logsumexp, width_curve
from hdiff.noise import get_process
from hdiff.sampling import sample
from hdiff.schedulers import MaskedDiffusionScheduler

PROCESSES = ["masking", "uniform", "gaussian"]
ALPHAS = [0.0, 0.1, 0.5, 0.9, 1.0, "per-sample"]
RANDOM_GHMS = {
    "rhm-zipf-nc3-L3": lambda: GHM.random_hierarchy(4, 3, 2, 3, num_classes=3, rule_probs="zipf", seed=11),
    "rhm-uniform-m4": lambda: GHM.random_hierarchy(5, 4, 2, 2, num_classes=2, seed=12),
    "fac-sparse-L3": lambda: GHM.random_factorized(3, 2, 3, num_classes=2, concentration=0.2, seed=13),
    "fac-s3": lambda: GHM.random_factorized(4, 3, 2, num_classes=5, concentration=2.0, seed=14),
    "img-rhm-zipf-L2": lambda: GHM.random_hierarchy(3, 3, 4, 2, rule_probs="zipf", layout="image", seed=15),
    "img-fac-L2": lambda: GHM.random_factorized(2, 4, 2, num_classes=3, concentration=0.5, layout="image", seed=16),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small ops on a shared 2-core machine want one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noisy_batch(ghm, process, alpha, n=48, seed=0):
    """Noised samples of ``ghm`` and the alpha (a float, or ``(n,)`` for ``"per-sample"``)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g) if alpha == "per-sample" else alpha
    return process.add_noise(ghm.sample(n, generator=g), a, generator=g), a


def assert_matches_oracle(lp_model, lp_oracle, tol=1e-4):
    """The exactness criterion of the module docstring."""
    assert lp_model.shape == lp_oracle.shape and lp_model.dtype == torch.float32
    assert not torch.isnan(lp_model).any()
    p_o, p_m = lp_oracle.exp(), lp_model.exp()
    sel = p_o > 1e-30
    assert (lp_model - lp_oracle).abs()[sel].max() < tol
    assert (p_m - p_o).abs().max() < 1e-6
    assert (p_m[lp_oracle == -torch.inf] < 1e-6).all()


# ----------------------------------------------------------------- exactness
@pytest.mark.parametrize("process_name", PROCESSES)
def test_forward_pass_is_bp(process_name, tiny_ghms):
    """Every tiny and random GHM (both families, mixed, ambiguous, images), every noise level."""
    worst = 0.0
    for name, make in {**tiny_ghms, **RANDOM_GHMS}.items():
        ghm = make()
        process = get_process(process_name, ghm.vocab_size)
        model, oracle = BPUNet.from_ghm(ghm, process).eval(), BPDenoiser(ghm, process)
        for i, alpha in enumerate(ALPHAS):
            x_t, a = noisy_batch(ghm, process, alpha, seed=i)
            with torch.no_grad():
                lp_m, lp_o = model(x_t, a), oracle(x_t, a)
            assert_matches_oracle(lp_m, lp_o)
            worst = max(worst, float((lp_m - lp_o).abs()[lp_o.exp() > 1e-30].max()))
    print(f"max |BPUNet - BP| ({process_name}): {worst:.2e}")  # shown with pytest -s (docs/bp_unet.md)


def test_log_space_network_with_exact_pairwise_lse_is_bp(tiny_ghms):
    """The finite-width graph (trees of pairwise log-sum-exps) with the exact g is BP too: only g is approximated."""
    for name in ["rhm-zipf-v4m3s2L2", "mixed-ambiguous", "fac-sparse", "img-rhm-v3m2L2", "rhm-zipf-nc3-L3"]:
        ghm = {**tiny_ghms, **RANDOM_GHMS}[name]()
        for process_name in PROCESSES:
            process = get_process(process_name, ghm.vocab_size)
            model = BPUNet.from_ghm(ghm, process, width=2).eval()
            for level in model.levels:
                level.pair = PairwiseLSE(None)
            for alpha in [0.0, 0.5, 0.9, 1.0]:
                x_t, a = noisy_batch(ghm, process, alpha, n=16)
                with torch.no_grad():
                    assert_matches_oracle(model(x_t, a), BPDenoiser(ghm, process)(x_t, a))


@pytest.mark.parametrize("name", ["rhm-zipf-nc3-L3", "mixed-ambiguous", "fac-sparse", "img-rhm-zipf-L2"])
def test_impossible_masking_evidence_gives_no_nan(name, tiny_ghms):
    """Kept tokens that contradict the grammar (the oracle's evidence is -inf): finite, normalised output."""
    ghm = {**tiny_ghms, **RANDOM_GHMS}[name]()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ghm.vocab_size, (64, *ghm.leaf_shape), generator=g)
    keep = torch.rand(tokens.shape, generator=g) < 0.95
    x_t = torch.where(keep, tokens, ghm.vocab_size)
    for width in [None, 4]:
        model = BPUNet.from_ghm(ghm, "masking", width=width).eval()
        with torch.no_grad():
            out = model(x_t, 0.999)
        assert torch.isfinite(out).all()
        assert torch.allclose(out.exp().sum(1), torch.ones(()), atol=1e-5)
    assert not torch.isfinite(ghm.log_prob(tokens)).all()  # the test does hit impossible rows


@pytest.mark.parametrize("name", ["rhm-zipf-v4m3s2L2", "mixed-ambiguous", "img-fac-v3L1"])
def test_masked_sampling_one_leaf_per_step_is_valid_and_exact(name, tiny_ghms, chi2_pvalue):
    ghm = tiny_ghms[name]()
    model = BPUNet.from_ghm(ghm, "masking").eval()
    scheduler = MaskedDiffusionScheduler(num_train_timesteps=1000, unmasking="fixed")
    x = sample(model, scheduler, batch_size=2000, num_inference_steps=ghm.num_leaves,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ghm.log_prob(x)).all()  # 100% valid
    assert chi2_pvalue(x, *enumerate_strings(ghm)) > 1e-3


def test_evidence_layer_is_the_leaf_likelihood(tiny_ghms):
    """The input layer equals ``process.leaf_log_likelihood`` up to a per-leaf constant (LOG_ZERO for -inf)."""
    ghm = tiny_ghms["img-rhm-v3m2L2"]()
    for process_name in PROCESSES:
        process = get_process(process_name, ghm.vocab_size)
        model = BPUNet.from_ghm(ghm, process)
        for alpha in [0.0, 0.3, 0.9, 1.0]:
            x_t, a = noisy_batch(ghm, process, alpha, n=8)
            ref = process.leaf_log_likelihood(x_t, a).flatten(1, 2)  # (B, N, v) in row-major order
            ref = ref - ref.amax(-1, keepdim=True)
            ours = model.leaf_evidence(x_t, process.alpha_tensor(a, 8, 1, x_t.device, torch.float32))
            ours = from_tree_order(ours, "image", ghm.depth).flatten(1, 2)
            finite = torch.isfinite(ref)
            assert torch.allclose(ours[finite], ref[finite], atol=1e-4)
            assert (ours[~finite] <= -1e4).all()


@pytest.mark.parametrize("name", ["rhm-zipf-v4m3s2L2", "mixed-ambiguous", "rhm-zipf-nc3-L3", "img-rhm-v3m2L2",
                                  "img-fac-L2"])
@pytest.mark.parametrize("process_name", PROCESSES)
def test_tree_features_are_bp_messages(name, process_name, tiny_ghms):
    """Encoder level l = BP's upward message U_l (up to a per-node constant, wherever BP's is finite); decoder
    level l after log_softmax = the log of BP's level-l marginals (the exactness criterion of the module
    docstring); both root first, in tree order, shaped (B, s**l, symbols(l)). BP runs in float64."""
    ghm = {**tiny_ghms, **RANDOM_GHMS}[name]()
    process = get_process(process_name, ghm.vocab_size)
    model = BPUNet.from_ghm(ghm, process).eval()
    for alpha in [0.3, 0.8, "per-sample"]:
        x_t, a = noisy_batch(ghm, process, alpha, n=24)
        feats = model.tree_features(x_t, a)
        assert len(feats["encoder"]) == ghm.depth and len(feats["decoder"]) == ghm.depth + 1
        evidence = process.leaf_log_likelihood(x_t, a).double()
        ups = upward_messages(ghm, evidence)
        marginals = posterior(ghm, evidence, levels=True).level_marginals
        for kind, refs in [("encoder", [u.log_softmax(-1) for u in ups[:-1]]), ("decoder", [m.log() for m in marginals])]:
            for l, (ours, ref) in enumerate(zip(feats[kind], refs)):
                ref = to_tree_order(ref, ghm.layout, l).reshape(24, ghm.branching**l, ghm.symbols(l))
                assert ours.shape == ref.shape and not ours.requires_grad, (kind, l)
                ours = ours.log_softmax(-1).double()
                # log space up, so every finite message is exact; the decoder's probability-space step
                # (the transposed conv) resolves posteriors down to float32's ~1e-38, as does the oracle
                sel = torch.isfinite(ref) if kind == "encoder" else ref > math.log(1e-30)
                assert (ours - ref).abs()[sel].max() < 1e-4, (kind, l)
                assert (ours.exp() - ref.exp()).abs().max() < 1e-6, (kind, l)
                assert (ours[ref == -torch.inf] < -1e3).all(), (kind, l)  # impossible: LOG_ZERO-scale here
    with pytest.raises(ValueError, match="alpha"):
        model.tree_features(x_t, 1.5)
    with pytest.raises(ValueError, match="x_t"):
        model.tree_features(x_t[:, :1], 0.5)


# ---------------------------------------------------------------- architecture
def test_pooling_layer_is_a_strided_conv():
    """The production encoder's z is Conv1d(kernel = stride = s) of the children's messages, bias log w."""
    ghm = GHM.random_hierarchy(4, 3, 2, 3, rule_probs="zipf", seed=0)
    level = BPUNet.from_ghm(ghm, "uniform").levels[1]
    u = torch.randn(2, 8, 4)  # (B, N children, C) tree order
    _, (_, z) = level.up(u.reshape(2, 4, 8))
    A, C, m, s = level.shape
    weight = level.rule_table.view(A * m, s, C).transpose(1, 2)  # (out, in channels, kernel)
    conv = F.conv1d(u.transpose(1, 2), weight, level.log_weight.flatten(), stride=s)
    assert torch.allclose(z, conv.transpose(1, 2), atol=1e-5)
    assert set(level.rule_table.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("width", [None, 3])
@pytest.mark.parametrize("process_name", PROCESSES)
def test_random_init_is_trainable(process_name, width):
    """Random init (constructor): finite outputs and gradients for every parameter; one Adam step lowers the loss."""
    torch.manual_seed(0)
    model = BPUNet(vocab_size=3, process=process_name, branching=2, depth=3, num_classes=2,
                   kernels=["production", "factorized", "production"], num_rules=[2, 1, 3],
                   inner_vocab_sizes=[4, 3], width=width)
    ghm = GHM.random_hierarchy(3, 2, 2, 3, num_classes=2, seed=1)
    x0 = ghm.sample(32, generator=torch.Generator().manual_seed(0))
    x_t = model.process.add_noise(x0, 0.6, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(2):
        loss = F.nll_loss(model(x_t, 0.6), x0)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[1] < losses[0]


@pytest.mark.parametrize("width", [None, 4])
def test_save_pretrained_round_trip(tmp_path, width, tiny_ghms):
    ghm = tiny_ghms["mixed-ambiguous"]()
    model = BPUNet.from_ghm(ghm, "gaussian", width=width).eval()
    x_t, _ = noisy_batch(ghm, model.process, 0.5, n=8)
    model.save_pretrained(tmp_path)
    loaded = BPUNet.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x_t, 0.5), model(x_t, 0.5))
    assert loaded.config.kernels == ["production", "factorized"] and loaded.level_sizes == [2, 4, 3]


def test_logits_contract_and_validation(tiny_ghms):
    ghm = tiny_ghms["rhm-v3m2s2L2"]()
    model = BPUNet.from_ghm(ghm, "uniform").eval()
    x_t, _ = noisy_batch(ghm, model.process, 0.4, n=4)
    u = torch.full((4,), 0.4)
    with torch.no_grad():
        assert torch.allclose(torch.log_softmax(model.logits(x_t, u), 1), model(x_t, 0.4), atol=1e-6)
    with pytest.raises(ValueError, match="x_t"):
        model(x_t[:, :2], 0.4)
    with pytest.raises(ValueError, match="alpha"):
        model(x_t, 1.5)
    for kwargs, field in [({"kernels": "hmm"}, "kernels"), ({"num_rules": [2]}, "num_rules"),
                          ({"inner_vocab_sizes": [3]}, "inner_vocab_sizes"), ({"width": 0}, "width"),
                          ({"activation": "tanh"}, "activation"), ({"process": "bad"}, "process"),
                          ({"num_classes": 0}, "num_classes")]:
        with pytest.raises(ValueError, match=field):
            BPUNet(**{"depth": 3, **kwargs})
    with pytest.raises(ValueError, match="vocab_size"):
        BPUNet.from_ghm(ghm, get_process("masking", 5))


def test_from_config_init(tiny_ghms):
    ghm = tiny_ghms["fac-nc2-v3s2L2"]()
    exact = bp_unet_from_config({"init": "ghm", "process": "masking", "vocab_size": 3, "depth": 2}, ghm)
    assert exact.config.kernels == ["factorized", "factorized"] and exact.config.num_classes == 2
    random = bp_unet_from_config({"process": "masking", "vocab_size": 3, "depth": 2, "kernels": "factorized"})
    assert isinstance(random, BPUNet) and not torch.equal(random.levels[0].transition, exact.levels[0].transition)
    with pytest.raises(ValueError, match="depth"):
        bp_unet_from_config({"init": "ghm", "depth": 3}, ghm)
    with pytest.raises(ValueError, match="init"):
        bp_unet_from_config({"init": "zeros"})


# ---------------------------------------------------------------- finite width
def test_fit_nonlinearity_converges_and_is_deterministic():
    errors = [fit_nonlinearity(w).max_error for w in (2, 8, 32, 128)]
    assert all(a > 3 * b for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4
    assert fit_nonlinearity(16, "silu").max_error < 0.01
    a, b = fit_nonlinearity(16), fit_nonlinearity(16, num_grid=4097)
    assert torch.equal(a.w2, b.w2)
    with pytest.raises(ValueError, match="width"):
        fit_nonlinearity(0)
    pair = PairwiseLSE(64)
    x = torch.randn(5, 7) * 10
    assert (tree_logsumexp(x, pair) - torch.logsumexp(x, -1)).abs().max() < 1e-3


@pytest.mark.parametrize("process_name,activation", [("masking", "relu"), ("gaussian", "silu")])
def test_width_curve_kl_decreases_with_width(process_name, activation):
    ghm = GHM.random_hierarchy(4, 2, 2, 3, rule_probs="zipf", seed=0)
    rows = width_curve(ghm, process_name, [None, 2, 4, 64], [0.5], num_samples=96, activation=activation)
    kl = {r["width"]: r["kl"] for r in rows}
    assert abs(kl[None]) < 1e-6
    assert kl[2] > kl[4] > kl[64] and kl[64] < 1e-5
    params = {r["width"]: r["num_parameters"] for r in rows}
    assert params[None] < params[4] < params[64]
