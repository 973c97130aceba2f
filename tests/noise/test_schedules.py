"""Schedules: one object per name, and training, schedulers and bounds agree on it for every process.

The bug this guards against: ``cosine`` once meant ``cos^2(pi t / 2)`` in the training loss and
``cos(pi t / 2)`` in the schedulers and the bounds, so a cosine run trained on one schedule and
sampled and bounded with another.
"""

import math

import pytest
import torch

from hdiff.noise import PROCESS_NAMES, SCHEDULE_NAMES, get_process, get_schedule, resolve_schedule
from hdiff.schedulers import make_scheduler
from hdiff.training.loss import diffusion_loss

V = 4
T = 1000


def test_closed_forms_and_end_points() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    want = {"linear": 1 - t, "cosine": torch.cos(math.pi * t / 2), "cosine_squared": torch.cos(math.pi * t / 2) ** 2}
    for name, alpha in want.items():
        assert torch.allclose(get_schedule(name).alpha(t), alpha.clamp(0, 1), atol=1e-12), name
    for name in SCHEDULE_NAMES:
        s = get_schedule(name)
        a = s.alpha(t)
        assert a[0] == pytest.approx(1.0) and a[-1] == pytest.approx(0.0, abs=1e-12), name
        assert (a.diff() <= 0).all(), name
        assert s.grid(T)[-1] == 0.0


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_derivative_and_elbo_weight_by_finite_differences(name: str) -> None:
    s, h = get_schedule(name), 1e-6
    t = torch.tensor([0.05, 0.3, 0.5, 0.9], dtype=torch.float64)
    fd = (s.alpha(t + h) - s.alpha(t - h)) / (2 * h)
    assert torch.allclose(s.alpha_derivative(t), fd, rtol=1e-5, atol=1e-8)
    assert torch.allclose(s.masked_elbo_weight(t), -fd / (1 - s.alpha(t)), rtol=1e-5)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="schedule must be one of"):
        get_schedule("cosine2")
    with pytest.raises(ValueError, match="process must be one of"):
        get_process("masked2", V)


class _Recorder:
    """A denoiser that records the alphas it is called with and returns a uniform posterior."""

    def __init__(self, process) -> None:
        self.process = process
        self.alphas: list[torch.Tensor] = []

    def __call__(self, x_t: torch.Tensor, alpha) -> torch.Tensor:
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1).expand(x_t.shape[0])
        self.alphas.append(a.clone())
        shape = (x_t.shape[0], V, *self.process.leaf_shape_of(x_t))
        return torch.full(shape, -math.log(V))


@pytest.mark.parametrize("process_name", PROCESS_NAMES)
@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_training_schedulers_and_bounds_agree(process_name: str, schedule_name: str) -> None:
    """For every process and schedule, alpha(t) is the same function in the three places."""
    process, schedule = get_process(process_name, V), get_schedule(schedule_name)
    x0 = torch.randint(0, V, (64, 4), generator=torch.Generator().manual_seed(0))

    # 1. training: diffusion_loss draws t ~ U(t_min, 1) from the generator and noises to alpha(t)
    rec = _Recorder(process)
    g = torch.Generator().manual_seed(1)
    diffusion_loss(rec, x0, process, schedule=schedule_name, t_min=1e-3, elbo=False, generator=g)
    t = 1e-3 + (1 - 1e-3) * torch.rand(64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rec.alphas[0], schedule.alpha(t).double(), atol=1e-6)

    # 2. schedulers: alphas_cumprod[k] = alpha((k + 1) / T) for every scheduler of the process
    grid = schedule.alpha(torch.arange(1, T + 1, dtype=torch.float64) / T)
    for name in process.schedulers:
        if name == "discrete-ddim":  # diffusers' own fixed schedule: it reads alpha = t / steps, no table
            continue
        ac = torch.as_tensor(make_scheduler(name, schedule=schedule_name).alphas_cumprod, dtype=torch.float64)
        # the last step is fully noised (alpha = 0), which a Gaussian scheduler caps at beta = 0.999
        assert torch.allclose(ac[:-1], grid[:-1], atol=1e-5, rtol=1e-4), (name, schedule_name)
        assert ac[-1] <= max(float(grid[-2]) * 1e-3, 1e-12) + 1e-9

    # 3. bounds: each draw u maps to the level the process's bound integrand uses
    rec = _Recorder(process)
    u = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    process.bound_term(rec, x0[:3], u, schedule, generator=torch.Generator().manual_seed(2))
    if process_name == "masking":
        assert torch.allclose(rec.alphas[0], schedule.alpha(u), atol=1e-6)
    elif process_name == "uniform":  # t = u^3 (importance sampling of small t)
        assert torch.allclose(rec.alphas[0], schedule.alpha(u ** 3), atol=1e-6)
    else:  # the VDM bound integrates over log-SNR: it depends on the schedule only through its end points
        g_min, g_max = process.log_snr_range
        assert torch.allclose(rec.alphas[1], torch.sigmoid(g_min + u * (g_max - g_min)), atol=1e-6)


@pytest.mark.parametrize("process_name", PROCESS_NAMES)
def test_auto_is_the_process_default(process_name: str) -> None:
    p = get_process(process_name, V)
    assert resolve_schedule("auto", p).name == p.default_schedule
    assert resolve_schedule("cosine", p).name == "cosine"
