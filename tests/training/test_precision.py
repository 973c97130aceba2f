"""Mixed precision and ``torch.compile`` in training (docs/performance.md).

On CPU: bf16 autocast works (accelerate), fp16 is refused before anything is written, one process
can train with several precisions in turn, and ``run.compile`` is opt-in (wired cheaply with a
stand-in compile; the real inductor compile is ``slow``: ~70 s cold on the 2-core CI machine). The
CUDA cases (bf16, fp16 with its gradient scaler, compile) are marked ``gpu`` and skipped without a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import hdiff.training.trainer as trainer
from hdiff.training import load_train_config, load_trained, train

from .conftest import tiny_config

CUDA = torch.cuda.is_available()


def record_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Make ``train`` build its model with a hook that records the output dtype of its first layer."""
    seen: list[torch.dtype] = []
    build = trainer.build_model

    def build_and_hook(cfg, ghm):
        model = build(cfg, ghm)
        first = next(m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)))
        first.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(trainer, "build_model", build_and_hook)
    return seen


def test_defaults_are_full_precision_and_eager() -> None:
    cfg = tiny_config()
    assert cfg.run.mixed_precision == "no" and cfg.run.compile is False
    demo = load_train_config(Path(__file__).parents[2] / "configs" / "train_demo.toml")
    assert demo.run.compile is False


def test_compile_must_be_a_bool() -> None:
    with pytest.raises((TypeError, ValueError), match="run.compile"):
        tiny_config(run={"compile": "yes"})


@pytest.mark.skipif(CUDA, reason="the refusal is for machines without a GPU")
def test_fp16_refused_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.raises(ValueError, match='fp16.*CUDA GPU.*"bf16"'):
        train(tiny_config(run={"mixed_precision": "fp16"}), out, progress=False)
    assert not out.exists()  # refused before anything was written


def test_bf16_autocasts_the_forward_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on this machine's device (CPU here): the model's layers run in bf16 during training (and
    the held-out evaluations of the log), the loss stays close to float32's, and the saved weights
    are float32. Also: one process trains with
    float32, then bf16, then float32 again (accelerate keeps one precision per process otherwise)."""
    seen = record_dtypes(monkeypatch)
    steps = {"max_steps": 20}
    full = train(tiny_config(optim=steps), tmp_path / "fp32", progress=False)
    assert set(seen) == {torch.float32}
    seen.clear()
    half = train(tiny_config(optim=steps, run={"mixed_precision": "bf16"}), tmp_path / "bf16", progress=False)
    assert set(seen) == {torch.bfloat16}  # training and the in-training evaluations run under autocast
    assert math.isfinite(half.loss) and math.isfinite(half.heldout_loss)
    assert abs(half.heldout_loss - full.heldout_loss) < 0.02 * full.heldout_loss
    model, _, cfg = load_trained(tmp_path / "bf16")
    assert cfg.run.mixed_precision == "bf16"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    again = train(tiny_config(optim=steps), tmp_path / "fp32-again", progress=False)
    assert again.heldout_loss == full.heldout_loss  # float32 once more, bit-identical


def test_compile_is_opt_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run.compile`` hands the prepared model to ``torch.compile`` (here a stand-in that returns it
    unchanged, so the wiring is tested without paying for a compile); the default never does."""
    compiled: list[nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    steps = {"max_steps": 10}
    plain = train(tiny_config(optim=steps), tmp_path / "eager", progress=False)
    assert compiled == []
    wired = train(tiny_config(optim=steps, run={"compile": True}), tmp_path / "compiled", progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], nn.Module)
    assert wired.heldout_loss == plain.heldout_loss


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    """The real inductor compile on CPU (~70 s cold, ~15 s with its cache warm, on the CI machine):
    the same losses as eager to float32 rounding, and a run directory that loads as usual."""
    steps = {"max_steps": 10}
    eager = train(tiny_config(optim=steps), tmp_path / "eager", progress=False)
    compiled = train(tiny_config(optim=steps, run={"compile": True}), tmp_path / "compiled", progress=False)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-4)
    assert compiled.heldout_loss == pytest.approx(eager.heldout_loss, rel=1e-4)
    model, _, _ = load_trained(tmp_path / "compiled")
    assert not any(k.startswith("_orig_mod") for k in model.state_dict())


# ---------------------------------------------------------------- CUDA (benchmarks/device_check.sh runs these)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_cuda_mixed_precision_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str,
                                     dtype: torch.dtype) -> None:
    """bf16 and fp16 autocast on a GPU: the layers run in the half type, fp16 through accelerate's
    gradient scaler (an overflowing step is skipped, not reported as divergence), the losses are
    finite and close to float32's."""
    seen = record_dtypes(monkeypatch)
    steps = {"max_steps": 40}
    full = train(tiny_config(optim=steps), tmp_path / "fp32", progress=False)
    seen.clear()
    half = train(tiny_config(optim=steps, run={"mixed_precision": precision}), tmp_path / precision, progress=False)
    assert dtype in seen
    assert math.isfinite(half.loss) and math.isfinite(half.heldout_loss)
    assert abs(half.heldout_loss - full.heldout_loss) < 0.05 * full.heldout_loss
    model, _, _ = load_trained(tmp_path / precision)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_cuda_compiled_training_matches_eager(tmp_path: Path) -> None:
    steps = {"max_steps": 20}
    eager = train(tiny_config(optim=steps), tmp_path / "eager", progress=False)
    compiled = train(tiny_config(optim=steps, run={"compile": True, "mixed_precision": "bf16"}),
                     tmp_path / "compiled", progress=False)
    assert math.isfinite(compiled.heldout_loss)
    assert abs(compiled.heldout_loss - eager.heldout_loss) < 0.05 * eager.heldout_loss
