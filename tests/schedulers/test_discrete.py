"""hdiff's discrete schedulers: schedule, timestep grid, exact reverse kernels, config, bad input."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from hdiff.schedulers import DiscreteSchedulerOutput, MaskedDiffusionScheduler, UniformDiffusionScheduler

V = 4
PI = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # prior of the 1-leaf model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def masked(**kw):
    return MaskedDiffusionScheduler(**kw)


def both(**kw):
    return [MaskedDiffusionScheduler(**kw), UniformDiffusionScheduler(**kw)]


def pvalue(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=len(probs)).double().numpy()
    keep = probs.numpy() > 0
    assert counts[~keep].sum() == 0, "drew a token of probability 0"
    return float(chisquare(counts[keep], probs.numpy()[keep] * tokens.numel()).pvalue)


# ---------------------------------------------------------------- schedule and timesteps
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_alphas_cumprod_endpoints_and_monotone(schedule):
    T = 50
    for s in both(num_train_timesteps=T, schedule=schedule):
        a = s.alphas_cumprod
        assert a.dtype == torch.float64 and a.shape == (T,)
        assert a[-1] == 0.0 and s.alpha_at(-1) == 1.0
        first = 1 - 1 / T if schedule == "linear" else math.cos(math.pi / (2 * T))
        assert a[0].item() == pytest.approx(first, abs=1e-15)
        assert (a[1:] < a[:-1]).all()
        assert s.init_noise_sigma == 1.0 and s.order == 1 and len(s) == T
        x = torch.zeros(2, 3, dtype=torch.long)
        assert s.scale_model_input(x, 3) is x


def test_set_timesteps_subsamples_without_truncating():
    T = 1000
    s = UniformDiffusionScheduler(num_train_timesteps=T)
    s.set_timesteps(T)
    assert torch.equal(s.timesteps, torch.arange(T - 1, -1, -1))
    s.set_timesteps(10)
    assert s.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps.dtype == torch.long and s.num_inference_steps == 10
    s.set_timesteps(1)
    assert s.timesteps.tolist() == [T - 1] and s.previous_timestep(T - 1) == -1
    for T in (2, 7, 13):
        s = MaskedDiffusionScheduler(num_train_timesteps=T)
        for n in range(1, T + 1):
            s.set_timesteps(n)
            ts = s.timesteps.tolist()
            assert len(ts) == n == len(set(ts)) and ts[0] == T - 1 and ts == sorted(ts, reverse=True)
            assert [s.previous_timestep(t) for t in ts] == ts[1:] + [-1]
        for bad in (0, T + 1, 2.0):
            with pytest.raises(ValueError, match="num_inference_steps"):
                s.set_timesteps(bad)


# ---------------------------------------------------------------- masked steps
def test_bernoulli_reveal_probability_and_rate():
    s = masked(num_train_timesteps=1000, schedule="cosine")
    s.set_timesteps(8)
    t = int(s.timesteps[3])
    a_t, a_s = s.alphas_cumprod[t].item(), s.alphas_cumprod[s.previous_timestep(t)].item()
    p = s.reveal_probability(t)
    assert p == pytest.approx((a_s - a_t) / (1 - a_t), rel=1e-14)
    assert s.reveal_probability(int(s.timesteps[-1])) == 1.0
    x = torch.full((5000, 10), V)
    out = s.step(torch.zeros(5000, V, 10), t, x, generator=gen())
    rate = (out.prev_sample != V).double().mean().item()
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / x.numel())
    assert (out.pred_original_sample < V).all()


def test_fixed_reveals_expected_count_per_row_uniformly():
    N, B = 16, 3000
    s = masked(unmasking="fixed")
    s.set_timesteps(10)
    t = int(s.timesteps[2])
    a_s = s.alpha_at(s.previous_timestep(t))
    x = torch.randint(0, V, (B, N), generator=gen(1))
    x = torch.where(torch.rand(B, N, generator=gen(2)) < torch.linspace(0, 1, B).unsqueeze(1), V, x)  # varied #masked
    out = s.step(torch.randn(B, V, N, generator=gen(3)), t, x, generator=gen())
    before, after = (x == V).sum(1), (out.prev_sample == V).sum(1)
    expected = (before - math.floor(N * (1 - a_s) + 0.5)).clamp(min=0).minimum(before)
    assert torch.equal(before - after, expected) and expected.max() > 0
    assert torch.equal(out.prev_sample[x != V], x[x != V])  # revealed tokens never change
    assert torch.equal(s.num_to_reveal(x == V, t), expected)
    # from all-MASK, every position is equally likely to be revealed
    out = s.step(torch.zeros(B, V, N), t, torch.full((B, N), V), generator=gen(4))
    k = N - math.floor(N * (1 - a_s) + 0.5)
    freq, p = (out.prev_sample != V).double().mean(0), k / N
    assert ((freq - p).abs() <= 4.5 * math.sqrt(p * (1 - p) / B)).all()


def test_fixed_one_token_per_step_image():
    s = masked(unmasking="fixed")
    x = torch.full((6, 4, 4), V)
    s.set_timesteps(16)
    g = gen()
    for j, t in enumerate(s.timesteps):
        x = s.step(torch.randn(6, V, 4, 4, generator=g), t, x, generator=g).prev_sample
        assert ((x == V).sum((1, 2)) == 15 - j).all()
    assert (x < V).all()


@pytest.mark.parametrize("unmasking", ["bernoulli", "fixed"])
def test_masked_given_x0_and_final_step_clean(unmasking):
    s = masked(unmasking=unmasking)
    s.set_timesteps(4)
    x0 = torch.randint(0, V, (50, 12), generator=gen(1))
    x = torch.full_like(x0, V)
    logits = torch.randn(50, V, 12, generator=gen(2))
    logits[:, 0] = -math.inf  # the model excludes token 0: never drawn
    g = gen()
    for t in s.timesteps:
        out = s.step(logits, t, x, generator=g, x0=x0)
        revealed = out.prev_sample != V
        assert torch.equal(out.prev_sample[revealed], x0[revealed]) and torch.equal(out.pred_original_sample, x0)
        x = out.prev_sample
    assert torch.equal(x, x0)
    x, g = torch.full_like(x0, V), gen()
    for t in s.timesteps:
        x, pred = s.step(logits, t, x, generator=g, return_dict=False)
    assert (x < V).all() and (x != 0).all() and torch.equal(x, pred)


# ---------------------------------------------------------------- uniform kernels
def brute_force(prior, x_t, a_t, a_s, v, d3pm=False):
    """p(x_s = c | x_t) by enumerating x0 = a and x_s = c for one token (D3PM: no division by q(x_t | a))."""
    def q(c, b, alpha):  # q(x = c | x' = b) for keep probability alpha
        return alpha * (c == b) + (1 - alpha) / v
    out = torch.zeros(v, dtype=torch.float64)
    for c in range(v):
        for a in range(v):
            term = prior[a] * q(x_t, c, a_t / a_s) * q(c, a, a_s)
            out[c] += term if d3pm else term / q(x_t, a, a_t)
    return out / out.sum()


def test_uniform_reverse_probs_is_exact_bayes_not_d3pm():
    v = 5
    s = UniformDiffusionScheduler()
    s.set_timesteps(7)
    g = gen(5)
    max_d3pm_gap = 0.0
    for t in s.timesteps.tolist():
        logits = torch.randn(1, v, 1, generator=g, dtype=torch.float64) * 2
        prior = torch.softmax(logits[0, :, 0], 0)
        for x_t in range(v):
            got = s.reverse_probs(logits, t, torch.tensor([[x_t]]))[0, :, 0]
            a_t, a_s = s.alpha_at(t), s.alpha_at(s.previous_timestep(t))
            assert torch.allclose(got, brute_force(prior, x_t, a_t, a_s, v), rtol=0, atol=1e-10)
            max_d3pm_gap = max(max_d3pm_gap, (got - brute_force(prior, x_t, a_t, a_s, v, d3pm=True)).abs().max().item())
    assert max_d3pm_gap > 1e-2  # D3PM's x0-parametrisation over-weights the observed token
    probs = s.reverse_probs(torch.randn(3, v, 4, 4, generator=g), int(s.timesteps[2]), torch.randint(0, v, (3, 4, 4)))
    assert probs.shape == (3, v, 4, 4) and torch.allclose(probs.sum(1), torch.ones(3, 4, 4, dtype=torch.float64))


def test_uniform_final_step_returns_x0_and_shapes():
    s = UniformDiffusionScheduler(schedule="cosine")
    s.set_timesteps(5)
    x0 = torch.randint(0, V, (8, 4, 4), generator=gen(1))
    x = torch.randint(0, V, (8, 4, 4), generator=gen(2))
    g = gen()
    for t in s.timesteps:
        out = s.step(torch.randn(8, V, 4, 4, generator=g), t, x, generator=g, x0=x0)
        assert isinstance(out, DiscreteSchedulerOutput) and torch.equal(out.pred_original_sample, x0)
        x = out.prev_sample
        assert x.shape == x0.shape and x.dtype == torch.long and 0 <= x.min() and x.max() < V
    assert torch.equal(x, x0)


# ---------------------------------------------------------------- end to end exactness on one token
def exact_posterior(kind, x_t, alpha):
    """log p(x0 | x_t) for a 1-leaf model with prior PI, (B, V, 1)."""
    logp = PI.log().view(1, V, 1).expand(x_t.shape[0], V, 1).clone()
    if kind == "masked":
        seen = x_t[:, 0] != V
        onehot = torch.nn.functional.one_hot(x_t[seen, 0], V).double()
        logp[seen, :, 0] = onehot.log()
    else:
        logp = logp + (alpha * torch.nn.functional.one_hot(x_t, V).movedim(-1, 1).double() + (1 - alpha) / V).log()
    return torch.log_softmax(logp, 1)


@pytest.mark.parametrize("kind,unmasking,schedule", [("masked", "bernoulli", "linear"), ("masked", "fixed", "cosine"),
                                                     ("uniform", None, "linear"), ("uniform", None, "cosine")])
def test_reverse_chain_reproduces_prior_on_one_token(kind, unmasking, schedule):
    B = 20000
    if kind == "masked":
        s = MaskedDiffusionScheduler(schedule=schedule, unmasking=unmasking)
        x = torch.full((B, 1), V)
    else:
        s = UniformDiffusionScheduler(schedule=schedule)
        x = torch.randint(0, V, (B, 1), generator=gen(1))
    s.set_timesteps(5)
    g = gen(2)
    for t in s.timesteps:
        x = s.step(exact_posterior(kind, x, s.alpha_at(t)).float(), t, x, generator=g).prev_sample
        a_s = s.alpha_at(s.previous_timestep(t))
        # every intermediate marginal equals the forward marginal at alpha_s (fixed unmasking: only the end)
        if kind == "uniform":
            assert pvalue(x, a_s * PI + (1 - a_s) / V) > 1e-3
        elif unmasking == "bernoulli":
            assert pvalue(x, torch.cat([a_s * PI, torch.tensor([1 - a_s], dtype=torch.float64)])) > 1e-3
    assert (x < V).all() and pvalue(x, PI) > 1e-3


# ---------------------------------------------------------------- config, RNG, errors
@pytest.mark.parametrize("cls,kw", [(MaskedDiffusionScheduler, {"schedule": "cosine", "unmasking": "fixed"}),
                                    (UniformDiffusionScheduler, {"schedule": "cosine"})])
def test_save_load_round_trip(tmp_path, cls, kw):
    s = cls(num_train_timesteps=64, **kw)
    s.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    r = cls.from_pretrained(tmp_path)
    assert {k: r.config[k] for k in ("num_train_timesteps", *kw)} == {"num_train_timesteps": 64, **kw}
    assert torch.equal(r.alphas_cumprod, s.alphas_cumprod)
    x = torch.randint(0, V + (cls is MaskedDiffusionScheduler), (4, 9), generator=gen(1))
    mo = torch.randn(4, V, 9, generator=gen(2))
    outs = []
    for sch in (s, r):
        sch.set_timesteps(8)
        outs.append(sch.step(mo, int(sch.timesteps[3]), x, generator=gen(3), return_dict=False))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_only_the_given_generator_is_used():
    state = torch.get_rng_state()
    for s in both():
        s.set_timesteps(3)
        x = torch.randint(0, V, (5, 6), generator=gen(1))
        s.step(torch.randn(5, V, 6, generator=gen(2)), 999, x, generator=gen())
    assert torch.equal(torch.get_rng_state(), state)


def test_bad_inputs_raise():
    for bad, name in (({"schedule": "sqrt"}, "schedule"), ({"num_train_timesteps": 1}, "num_train_timesteps")):
        for cls in (MaskedDiffusionScheduler, UniformDiffusionScheduler):
            with pytest.raises(ValueError, match=name):
                cls(**bad)
    with pytest.raises(ValueError, match="unmasking"):
        MaskedDiffusionScheduler(unmasking="greedy")
    m, u = both(num_train_timesteps=100)
    x, mo = torch.randint(0, V, (2, 3)), torch.randn(2, V, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        m.step(mo, 99, x)
    m.set_timesteps(4)
    u.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep"):
        m.step(mo, 50, x)
    nan = mo.clone()
    nan[0, 0, 0] = math.nan
    cases = [(mo[:, :, :2], x, {}, "model_output"), (mo.long(), x, {}, "model_output"), (nan, x, {}, "model_output"),
             (mo, x.float(), {}, "sample"), (mo, x + 10, {}, "sample"),
             (mo, x, {"x0": x[:, :2]}, "x0"), (mo, x, {"x0": x.float()}, "x0")]
    for s in (m, u):
        for out, smp, kw, name in cases:
            with pytest.raises(ValueError, match=name):
                s.step(out, 99, smp, **kw)
    with pytest.raises(ValueError, match="sample"):  # MASK is not a uniform-noise state
        u.step(mo, 99, torch.full((2, 3), V))
    with pytest.raises(ValueError, match="model_output"):  # a masked leaf the model rules out entirely
        m.step(torch.full((2, V, 3), -math.inf), 99, torch.full((2, 3), V))
    with pytest.raises(ValueError, match="timestep"):
        u.reverse_probs(mo, 98, x)
    assert np.isclose(u.alpha_at(-1), 1.0)
