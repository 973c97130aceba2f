"""Gaussian reverse diffusion with the exact BP oracle through diffusers' own schedulers.

Claim (issue 3): DDPM (1000 steps), DDIM and Euler (100), DPM-Solver (25) give >= 99% valid samples,
and the root-class histogram and leaf-token marginals match the exact distribution within sampling
error (|z| < 4.5 on every cell), on small GHMs of both families and both layouts.
"""

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.ghm import GHM
from hdiff.noise import GaussianProcess
from hdiff.sampling import sample
from hdiff.schedulers.factory import make_scheduler

from ._stats import Z_MAX, leaf_marginal_z, root_z

GHMS = {
    "rhm": lambda: GHM.random_hierarchy(4, 2, 2, 3, seed=1),
    "factorized": lambda: GHM.random_factorized(3, 2, 3, seed=2),
    "image-rhm": lambda: GHM.random_hierarchy(3, 2, 4, 2, layout="image", seed=3),
}
SAMPLERS = [("ddim", 100), ("euler", 100), ("dpmsolver", 25),
            pytest.param("ddpm", 1000, marks=pytest.mark.slow)]


@pytest.mark.parametrize("ghm_name", list(GHMS))
@pytest.mark.parametrize("scheduler,steps", SAMPLERS)
def test_oracle_gaussian_sampling_is_exact(ghm_name, scheduler, steps):
    ghm = GHMS[ghm_name]()
    denoiser = BPDenoiser(ghm, GaussianProcess(ghm.vocab_size))
    n = 1000 if scheduler == "ddpm" else 2000
    x = sample(denoiser, make_scheduler(scheduler), batch_size=n, num_inference_steps=steps,
               generator=torch.Generator().manual_seed(0))
    assert x.shape == (n, *ghm.leaf_shape)
    assert torch.isfinite(ghm.log_prob(x)).float().mean() >= 0.99
    assert leaf_marginal_z(ghm, x) < Z_MAX
    assert root_z(ghm, x) < Z_MAX


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpmsolver"])
def test_every_prediction_type_gives_valid_samples(scheduler, prediction_type):
    ghm = GHM.random_hierarchy(8, 2, 2, 4, seed=0)  # the demo GHM
    denoiser = BPDenoiser(ghm, GaussianProcess(8))
    x = sample(denoiser, make_scheduler(scheduler, prediction_type=prediction_type), batch_size=300,
               num_inference_steps=50, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(ghm.log_prob(x)).all()


def test_wrong_sampler_for_a_biased_denoiser_is_detected():
    """The statistics above can fail: a denoiser that ignores the grammar (uniform posteriors) gives invalid samples."""

    class Blind:
        process = GaussianProcess(4)
        leaf_shape = (8,)

        def __call__(self, x_t, alpha):
            return torch.full((x_t.shape[0], 4, 8), -torch.log(torch.tensor(4.0)))

    ghm = GHMS["rhm"]()
    x = sample(Blind(), make_scheduler("ddim"), batch_size=500, num_inference_steps=20,
               generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(ghm.log_prob(x)).float().mean() < 0.5
