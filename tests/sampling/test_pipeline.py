"""The pipeline and the plain sampling loop: outputs, determinism, no state leaking between calls, CLI."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from hdiff.cli import main
from hdiff.denoisers import BPDenoiser
from hdiff.ghm import GHM
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess
from hdiff.sampling import HierarchicalDiffusionPipeline, sample
from hdiff.schedulers import MaskedDiffusionScheduler, make_scheduler


@pytest.fixture(scope="module")
def ghm():
    return GHM.random_hierarchy(8, 2, 2, 4, seed=0)


def test_pipeline_output_and_determinism(ghm):
    process = MaskingProcess(8)
    pipe = HierarchicalDiffusionPipeline(BPDenoiser(ghm, process), MaskedDiffusionScheduler(unmasking="fixed"), process)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=32, num_inference_steps=16, generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (32, 16) and out.tokens.dtype == torch.long
    assert torch.isfinite(ghm.log_prob(out.tokens)).all()
    again = pipe(batch_size=32, num_inference_steps=16, generator=torch.Generator().manual_seed(0), return_dict=False)[0]
    assert torch.equal(out.tokens, again)


@pytest.mark.parametrize("process,scheduler", [(GaussianProcess(8), "dpmsolver"), (MaskingProcess(8), "masked"),
                                               (UniformProcess(8), "uniform")], ids=["dpm", "masked", "uniform"])
def test_no_state_leaks_between_calls(ghm, process, scheduler):
    sched = make_scheduler(scheduler)
    d = BPDenoiser(ghm, process)
    first = sample(d, sched, batch_size=16, num_inference_steps=10, generator=torch.Generator().manual_seed(3))
    sample(d, sched, batch_size=5, num_inference_steps=7, generator=torch.Generator().manual_seed(9))  # other settings
    second = sample(d, sched, batch_size=16, num_inference_steps=10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    assert getattr(sched, "num_inference_steps", None) is None  # the caller's scheduler was never touched


def test_bad_pipeline_arguments(ghm):
    d = BPDenoiser(ghm, MaskingProcess(8))
    with pytest.raises(ValueError, match="process"):
        HierarchicalDiffusionPipeline(d, MaskedDiffusionScheduler(), UniformProcess(8))
    with pytest.raises(ValueError, match="x0_mode"):
        sample(d, MaskedDiffusionScheduler(), batch_size=2, num_inference_steps=2, x0_mode="greedy")
    with pytest.raises(ValueError, match="batch_size"):
        sample(d, MaskedDiffusionScheduler(), batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="prediction_type"):
        sample(BPDenoiser(ghm, GaussianProcess(8)), MaskedDiffusionScheduler(), batch_size=2, num_inference_steps=2)

    class NoJoint:
        process = MaskingProcess(8)
        leaf_shape = (16,)

        def __call__(self, x_t, alpha):
            return torch.full((x_t.shape[0], 8, 16), -float(np.log(8)))

    with pytest.raises(ValueError, match="joint"):
        sample(NoJoint(), MaskedDiffusionScheduler(), batch_size=2, num_inference_steps=2, x0_mode="joint")


def test_gaussian_pipeline_with_ddim(ghm):
    process = GaussianProcess(8)
    pipe = HierarchicalDiffusionPipeline(BPDenoiser(ghm, process), DDIMScheduler(clip_sample=False), process)
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(batch_size=64, num_inference_steps=30, generator=torch.Generator().manual_seed(0)).tokens
    assert torch.isfinite(ghm.log_prob(tokens)).all()


@pytest.mark.parametrize("args", [["--process", "masked", "--scheduler", "masked", "--unmasking", "fixed", "--steps", "16"],
                                  ["--process", "gaussian", "--scheduler", "ddim", "--steps", "20"],
                                  ["--process", "uniform", "--scheduler", "discrete-ddim", "--steps", "8", "--x0-mode", "joint"]],
                         ids=["masked", "gaussian", "discrete-ddim"])
def test_cli_sample_with_the_oracle(tmp_path, args):
    cfg = tmp_path / "ghm.toml"
    cfg.write_text("[ghm]\nvocab_size = 8\nnum_rules = 2\nbranching = 2\ndepth = 4\n")
    out = tmp_path / "out"
    assert main(["sample", "--ghm", str(cfg), "--denoiser", "oracle", "--num", "40", "--out", str(out), *args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validity"] == 1.0 and metrics["num_samples"] == 40
    assert abs(metrics["nll_bits_per_leaf"] - 1.125) < 1e-9  # uniform over 8 * 2**15 strings: 18/16 bits per leaf
    assert abs(sum(metrics["root_histogram"]) - 1) < 1e-9
    assert torch.load(out / "tokens.pt").shape == (40, 16) and np.load(out / "tokens.npy").shape == (40, 16)
    assert (out / "samples.png").stat().st_size > 0


def test_cli_sample_rejects_unknown_ghm_keys(tmp_path, capsys):
    cfg = tmp_path / "ghm.toml"
    cfg.write_text("[ghm]\nvocab = 8\n")
    assert main(["sample", "--ghm", str(cfg), "--out", str(tmp_path / "o")]) == 2  # one line, exit status 2
    assert "vocab" in capsys.readouterr().err
    with pytest.raises(ValueError, match="vocab"):  # --debug shows the exception itself
        main(["sample", "--debug", "--ghm", str(cfg), "--out", str(tmp_path / "o")])
