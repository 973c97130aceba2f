"""One contract suite over every denoiser: the BP oracle, the tree U-Net and the diffusers baselines.

The contract (DESIGN.md, "the denoiser currency"): ``denoiser(x_t, alpha)`` returns float32
log-probabilities ``(B, v, *leaf_shape)`` that normalise over dim 1, row by row independently of
the rest of the batch, deterministically, for a float or per-sample alpha; it runs through
``hdiff.sampling.sample`` with every scheduler of its process; it rejects bad input with a
``ValueError``; learned ones survive ``save_pretrained`` / ``from_pretrained`` unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

from hdiff.denoisers import BPDenoiser, Denoiser, LearnedDenoiser
from hdiff.models import TreeUNet, UNet1DBaseline, UNet2DBaseline
from hdiff.noise import get_process as make_process
from hdiff.ghm import GHM
from hdiff.sampling import HierarchicalDiffusionPipeline, sample
from hdiff.schedulers import make_scheduler, scheduler_options

V = 4
KINDS = ("gaussian", "masking", "uniform")
SCHEDULERS = {"gaussian": ("ddim", "ddpm", "euler", "dpmsolver"), "masking": ("masked",),
              "uniform": ("uniform", "discrete-ddim")}
SEQ = dict(branching=2, depth=3)  # 8 leaves
IMG = dict(branching=4, depth=2, layout="image")  # 4x4 leaves


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded 2-core machine every
    parallel region waits for a descheduled thread (measured: 6 ms -> 0.8 s per U-Net call)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


CASES = {
    "bp-seq": lambda kind: BPDenoiser(GHM.random_hierarchy(V, 2, 2, 3, seed=0), make_process(kind, V)),
    "bp-img": lambda kind: BPDenoiser(GHM.random_hierarchy(V, 2, 4, 2, layout="image", seed=0), make_process(kind, V)),
    "tree-seq": lambda kind: _seeded(lambda: TreeUNet(V, kind, channels=16, noise_embedding_dim=16, **SEQ)),
    "tree-img": lambda kind: _seeded(lambda: TreeUNet(V, kind, channels=[16, 24, 32], noise_embedding_dim=16, **IMG)),
    "unet1d": lambda kind: _seeded(lambda: UNet1DBaseline(V, kind, block_out_channels=(8, 16), **SEQ)),
    "unet2d": lambda kind: _seeded(lambda: UNet2DBaseline(V, kind, depth=2, block_out_channels=(8, 16))),
}
LEARNED = [name for name in CASES if not name.startswith("bp")]


def build(name: str, kind: str):
    denoiser = CASES[name](kind)
    if isinstance(denoiser, torch.nn.Module):
        denoiser.eval()  # dropout off; the contract is about inference
    return denoiser


def noisy_batch(denoiser, batch: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A valid ``x_t`` for the denoiser's process, at per-sample signal levels (0 and 1 included)."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, V, (batch, *denoiser.leaf_shape), generator=g)
    if isinstance(denoiser, BPDenoiser):
        x0 = denoiser.ghm.sample(batch, generator=g)  # the oracle needs evidence its GHM can explain
    alpha = torch.linspace(0.0, 1.0, batch)
    return denoiser.process.add_noise(x0, alpha, generator=g), alpha


@pytest.fixture(params=[(n, k) for n in CASES for k in KINDS], ids=[f"{n}-{k}" for n in CASES for k in KINDS])
def denoiser(request):
    return build(*request.param)


@torch.no_grad()
def test_output_is_normalised_log_probs(denoiser):
    assert isinstance(denoiser, Denoiser)
    x_t, alpha = noisy_batch(denoiser)
    for a in (alpha, 0.3, torch.tensor(0.3)):  # per-sample tensor, float, 0-d tensor
        out = denoiser(x_t, a)
        assert out.shape == (6, V, *denoiser.leaf_shape)
        assert out.dtype == torch.float32
        assert torch.allclose(out.logsumexp(1), torch.zeros(()), atol=1e-5)


@torch.no_grad()
def test_rows_are_independent_and_deterministic(denoiser):
    x_t, alpha = noisy_batch(denoiser)
    full = denoiser(x_t, alpha)
    assert torch.equal(full, denoiser(x_t, alpha))
    part = denoiser(x_t[2:4], alpha[2:4])
    assert torch.allclose(full[2:4], part, atol=1e-5)
    other, _ = noisy_batch(denoiser, seed=1)
    mixed = torch.cat([x_t[:3], other[3:]])
    assert torch.allclose(denoiser(mixed, alpha)[:3], full[:3], atol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_samples_through_every_scheduler(name, kind):
    denoiser = build(name, kind)
    for scheduler_name in SCHEDULERS[kind]:
        scheduler = make_scheduler(scheduler_name)
        with torch.no_grad():
            tokens = sample(denoiser, scheduler, batch_size=3, num_inference_steps=3,
                            generator=torch.Generator().manual_seed(0), **scheduler_options(scheduler_name))
        assert tokens.shape == (3, *denoiser.leaf_shape) and tokens.dtype == torch.int64, scheduler_name
        assert int(tokens.min()) >= 0 and int(tokens.max()) < V, scheduler_name


@pytest.mark.parametrize("name", LEARNED)
def test_pipeline_takes_a_learned_model(name):
    model = build(name, "masking")
    pipe = HierarchicalDiffusionPipeline(model, make_scheduler("masked"), make_process("masking", V))
    tokens = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).tokens
    assert tokens.shape == (2, *model.leaf_shape) and int(tokens.max()) < V


def bad_inputs(denoiser) -> dict[str, tuple[torch.Tensor, object]]:
    x_t, alpha = noisy_batch(denoiser)
    p = denoiser.process
    cases = {"alpha > 1": (x_t, 1.5), "alpha < 0": (x_t, -0.1), "alpha NaN": (x_t, float("nan")),
             "alpha wrong length": (x_t, alpha[:2]), "leaf shape": (x_t[..., :-1], alpha)}
    if p.discrete:
        cases["float tokens"] = (x_t.float(), alpha)
        cases["token > MASK"] = (torch.full_like(x_t, V + 1), alpha)
        cases["negative token"] = (torch.full_like(x_t, -1), alpha)
        if p.name != "masking":
            cases["MASK for uniform noise"] = (torch.full_like(x_t, V), alpha)
    else:
        cases["tokens for gaussian"] = (x_t.argmax(1), alpha)
        cases["wrong k"] = (x_t[:, :-1], alpha)
        cases["NaN state"] = (torch.full_like(x_t, float("nan")), alpha)
    return cases


@torch.no_grad()
def test_bad_input_raises_value_error(denoiser):
    for what, (x_t, alpha) in bad_inputs(denoiser).items():
        with pytest.raises(ValueError):
            denoiser(x_t, alpha)
            pytest.fail(what)


@pytest.mark.parametrize("name", LEARNED)
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(name, kind, tmp_path):
    model = build(name, kind)
    x_t, alpha = noisy_batch(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LearnedDenoiser) and loaded.process.name == kind
    public = lambda config: json.loads(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}))  # noqa: E731
    assert public(loaded.config) == public(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x_t, alpha), model(x_t, alpha))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", LEARNED)
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(name, kind):
    model = build(name, kind)
    x_t, alpha = noisy_batch(model)
    with torch.no_grad():
        cpu = model(x_t, alpha)
        gpu = model.to("cuda")(x_t.cuda(), alpha.cuda())
        assert gpu.device.type == "cuda"
        assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
        assert torch.allclose(model(x_t.cuda(), 0.5).logsumexp(1).cpu(), torch.zeros(()), atol=1e-5)
