"""Pipelines round-trip like diffusers: save_pretrained -> from_pretrained samples bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hdiff.denoisers import BPDenoiser
from hdiff.ghm import GHM
from hdiff.models import TreeUNet
from hdiff.noise import GaussianProcess, get_process
from hdiff.sampling import HierarchicalDiffusionPipeline
from hdiff.schedulers import make_scheduler, scheduler_options

GHM_SEQ = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
GHM_IMG = GHM.random_hierarchy(3, 2, 4, 2, layout="image", seed=1)

CASES = {  # name -> (ghm, process, scheduler name, scheduler kwargs, steps)
    "masking-fixed": (GHM_SEQ, "masking", "masked", {"unmasking": "fixed", "schedule": "cosine"}, 8),
    "uniform": (GHM_SEQ, "uniform", "uniform", {"schedule": "cosine_squared"}, 6),
    "uniform-discrete-ddim": (GHM_SEQ, "uniform", "discrete-ddim", {}, 6),
    "gaussian-ddim": (GHM_SEQ, "gaussian", "ddim", {"prediction_type": "v_prediction", "schedule": "cosine_squared_shifted"}, 10),
    "gaussian-euler": (GHM_SEQ, "gaussian", "euler", {}, 10),
    "image-masking": (GHM_IMG, "masking", "masked", {}, 6),
}


def _draw(pipe: HierarchicalDiffusionPipeline, scheduler_name: str, steps: int) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=16, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
                **scheduler_options(scheduler_name)).tokens


@pytest.mark.parametrize("case", list(CASES))
def test_oracle_pipeline_round_trip(case: str, tmp_path: Path) -> None:
    ghm, process_name, sched, kwargs, steps = CASES[case]
    process = get_process(process_name, ghm.vocab_size)
    pipe = HierarchicalDiffusionPipeline(BPDenoiser(ghm, process), make_scheduler(sched, **kwargs), process)
    before = _draw(pipe, sched, steps)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = HierarchicalDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.denoiser, BPDenoiser) and loaded.process == process
    assert type(loaded.scheduler) is type(pipe.scheduler)
    assert torch.equal(_draw(loaded, sched, steps), before)


def test_gaussian_embedding_is_saved(tmp_path: Path) -> None:
    emb = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    process = GaussianProcess(4, emb)
    pipe = HierarchicalDiffusionPipeline(BPDenoiser(GHM_SEQ, process), make_scheduler("ddim"), process)
    before = _draw(pipe, "ddim", 8)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = HierarchicalDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.process.embedding, process.embedding)
    assert torch.equal(_draw(loaded, "ddim", 8), before)


@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_learned_pipeline_round_trip(layout: str, tmp_path: Path) -> None:
    ghm = GHM_SEQ if layout == "sequence" else GHM_IMG
    torch.manual_seed(0)
    model = TreeUNet(vocab_size=ghm.vocab_size, branching=ghm.branching, depth=ghm.depth, layout=layout,
                     process="masking", channels=16).eval()
    with torch.no_grad():  # random, non-zero output layers: a model whose samples depend on every weight
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pipe = HierarchicalDiffusionPipeline(model, make_scheduler("masked"), model.process, ghm)
    before = _draw(pipe, "masked", 6)
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "model" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = HierarchicalDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.denoiser, TreeUNet) and loaded.ghm is not None
    assert torch.equal(_draw(loaded, "masked", 6), before)


def test_a_train_run_directory_loads_as_a_pipeline(tmp_path: Path) -> None:
    from hdiff.training import load_trained, train
    from tests.training.conftest import tiny_config

    cfg = tiny_config(optim={"max_steps": 10}, run={"checkpoint_every": 10, "eval_every": 10})
    train(cfg, tmp_path / "run", progress=False)
    model, ghm, _ = load_trained(tmp_path / "run")
    pipe = HierarchicalDiffusionPipeline(model, make_scheduler("masked", schedule=cfg.schedule), model.process, ghm)
    loaded = HierarchicalDiffusionPipeline.from_pretrained(tmp_path / "run")
    assert torch.equal(_draw(loaded, "masked", 8), _draw(pipe, "masked", 8))


def test_broken_pipeline_directories_name_the_file(tmp_path: Path) -> None:
    process = get_process("masking", 4)
    HierarchicalDiffusionPipeline(BPDenoiser(GHM_SEQ, process), make_scheduler("masked"), process).save_pretrained(tmp_path)
    meta = tmp_path / "pipeline.json"
    good = meta.read_text()
    meta.write_text(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match="pipeline.json"):
        HierarchicalDiffusionPipeline.from_pretrained(tmp_path)
    meta.write_text(json.dumps({**json.loads(good), "format": "other"}))
    with pytest.raises(ValueError, match="format"):
        HierarchicalDiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pipeline.json"):
        HierarchicalDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
