"""Learned-denoiser speed: forward ms of the tree U-Net and the diffusers baseline beside the BP oracle.

Cases (masking noise, each sample at its own signal level alpha ~ U(0, 1), the same x_t for every
denoiser of a case):

- B1: sequence RHM v=16, m=4, s=2, L=8 (256 leaves), batch 256 (the BP benchmark's B1)
- demo: sequence RHM v=8, m=2, s=2, L=4 (16 leaves), batch 128 (configs/demo_ghm.toml)

Denoisers: ``TreeUNet`` (channels 64, noise embedding 64), ``tree_unet_demo`` (the demo's: no
noise input, 2x-wide block MLPs), ``UNet1DBaseline`` (diffusers
UNet1DModel, default config), ``BPUNet.from_ghm`` (the U-Net that is exactly BP), ``BPDenoiser``
(the exact oracle); forward under
``torch.inference_mode`` in eval mode. Training: ms per step (draw alpha and x_t, forward,
``nll_loss``, backward, AdamW step) at batch 128 on the demo GHM, for the tree U-Net (width 64)
with fused AdamW and with torch's default AdamW (a loop over parameter tensors on CPU), the
baseline and the BP U-Net (random init) with fused AdamW.
Also the whole ``hdiff.training.train`` loop on configs/train_demo.toml (ms per step, 300 steps), as
is and at the demo's n = 8192 cells (batch 256) with one-hot and with training-set soft targets.

Timing: one warm-up call each, then the median (and min) of ``--repeats`` rounds, calls
interleaved within a round so that load from other processes hits every model alike.
``--threads 1 2`` runs everything once per intra-op thread count (default: torch's, left as
is); on a loaded 2-core machine one thread is the robust choice for these small tensors. Writes
``benchmarks/results/models.json`` atomically and prints a table.

``--device cuda`` runs the models, the oracle and the training steps on the GPU (the ``train()``
loop runs wherever accelerate puts it: the GPU when there is one).

Run: ``.venv/bin/python benchmarks/bench_models.py [--quick] [--threads 1 2] [--device cuda]``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench, machine_info, prepare_run, write_result  # noqa: E402
from torch.nn import functional as F

from hdiff.denoisers import BPDenoiser
from hdiff.models import BPUNet, TreeUNet, UNet1DBaseline
from hdiff.ghm import GHM
from hdiff.noise import MaskingProcess

CASES: dict[str, dict[str, int]] = {
    "B1": dict(v=16, m=4, s=2, L=8, batch=256),
    "demo": dict(v=8, m=2, s=2, L=4, batch=128),
}
WIDTH = 64
TRAIN_BATCH = 128
DEVICE = torch.device("cpu")  # --device: models and inputs are built on the CPU, then moved here


def timed(fns: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
    """On CUDA, each call waits for the GPU to finish (kernels are asynchronous), so the times are real."""
    if DEVICE.type != "cuda":
        return fns
    return {k: (lambda f=f: (f(), torch.cuda.synchronize(DEVICE))) for k, f in fns.items()}


def make_models(c: dict[str, int]) -> tuple[GHM, dict[str, Any]]:
    ghm = GHM.random_hierarchy(c["v"], c["m"], c["s"], c["L"], seed=0)
    torch.manual_seed(0)
    models = {
        "tree_unet": TreeUNet(c["v"], "masking", c["s"], c["L"], channels=WIDTH, noise_embedding_dim=WIDTH).eval(),
        # the demo's model: no noise input (masking), 2x-wide block MLPs
        "tree_unet_demo": TreeUNet(c["v"], "masking", c["s"], c["L"], channels=WIDTH, mlp_ratio=2,
                                   noise_conditioning=False).eval(),
        "unet1d": UNet1DBaseline(c["v"], "masking", c["s"], c["L"]).eval(),
        "bp_unet": BPUNet.from_ghm(ghm, "masking").eval(),
        "bp_oracle": BPDenoiser(ghm.to(DEVICE), MaskingProcess(c["v"])),
    }
    return ghm, {k: m.to(DEVICE) if isinstance(m, torch.nn.Module) else m for k, m in models.items()}


def num_params(model: Any) -> int | None:
    return sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else None


def forward_case(name: str, c: dict[str, int], repeats: int) -> list[dict[str, Any]]:
    ghm, models = make_models(c)
    g = torch.Generator().manual_seed(1)
    x0 = ghm.sample(c["batch"], generator=g)
    alpha = torch.rand(c["batch"], generator=g)
    x_t = MaskingProcess(c["v"]).add_noise(x0, alpha, generator=g)
    x_t, alpha = x_t.to(DEVICE), alpha.to(DEVICE)
    with torch.inference_mode():
        times = bench(timed({k: (lambda m=m: m(x_t, alpha)) for k, m in models.items()}), repeats)
    oracle = times["bp_oracle"]["median"]
    return [{"case": name, **c, "leaves": ghm.num_leaves, "model": k, "params": num_params(m),
             "ms": times[k]["median"], "ms_min": times[k]["min"], "x_oracle": times[k]["median"] / oracle}
            for k, m in models.items()]


def train_step_fn(model: torch.nn.Module, ghm: GHM, opt: torch.optim.Optimizer, seed: int) -> Callable[[], None]:
    """One step: fresh alpha and masking noise on a fixed batch, forward, nll, backward, AdamW."""
    g = torch.Generator().manual_seed(seed)
    x0 = ghm.sample(TRAIN_BATCH, generator=g).to(DEVICE)
    if DEVICE.type != "cpu":  # the step's draws come from a generator on the device
        g = torch.Generator(DEVICE).manual_seed(seed)
    process = model.process

    def step() -> None:
        alpha = torch.rand(TRAIN_BATCH, generator=g, device=DEVICE)
        loss = F.nll_loss(model(process.add_noise(x0, alpha, generator=g), alpha), x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def training(repeats: int) -> list[dict[str, Any]]:
    c = CASES["demo"]
    ghm, models = make_models(c)
    tree, unet, demo = models["tree_unet"].train(), models["unet1d"].train(), models["tree_unet_demo"].train()
    torch.manual_seed(0)
    bp_unet = BPUNet(c["v"], "masking", c["s"], c["L"], num_rules=c["m"]).train().to(DEVICE)
    tree_default = TreeUNet(c["v"], "masking", c["s"], c["L"], channels=WIDTH, noise_embedding_dim=WIDTH).train().to(DEVICE)
    runs = {
        "tree_unet/adamw-fused": (tree, torch.optim.AdamW(tree.parameters(), lr=1e-3, fused=True)),
        "tree_unet/adamw-default": (tree_default, torch.optim.AdamW(tree_default.parameters(), lr=1e-3)),
        "tree_unet_demo/adamw-fused": (demo, torch.optim.AdamW(demo.parameters(), lr=1e-3, fused=True)),
        "unet1d/adamw-fused": (unet, torch.optim.AdamW(unet.parameters(), lr=1e-3, fused=True)),
        "bp_unet/adamw-fused": (bp_unet, torch.optim.AdamW(bp_unet.parameters(), lr=1e-3, fused=True)),
    }
    times = bench(timed({k: train_step_fn(m, ghm, opt, seed=2) for k, (m, opt) in runs.items()}), repeats)
    return [{"case": "demo", **c, "batch": TRAIN_BATCH, "run": k, "params": num_params(m), "ms_per_step": times[k]["median"],
             "ms_per_step_min": times[k]["min"], "steps_per_s": 1e3 / times[k]["median"]} for k, (m, _) in runs.items()]


def train_loop(steps: int = 300, **overrides: Any) -> dict[str, Any]:
    """``hdiff.training.train`` itself on configs/train_demo.toml (the demo's tree U-Net, width 64,
    batch 128) with ``overrides`` (dotted config names): ms per step of the whole loop (data, noise,
    forward, backward, clipping, fused AdamW, EMA, logging, the soft target if any), evaluation and
    checkpoints pushed past the end; what ``hdiff compare`` pays per step."""
    import tempfile

    from hdiff.training import load_train_config, train

    cfg = load_train_config(Path(__file__).parent.parent / "configs" / "train_demo.toml").replace(**{
        "optim.max_steps": steps, "run.eval_every": 10**6, "run.checkpoint_every": 10**6, **overrides})
    with tempfile.TemporaryDirectory() as out:
        result = train(cfg, out, progress=False)
    # time_s includes the final held-out evaluation (a few hundred ms): a slight overestimate
    name = "train() loop, tree_unet" + "".join(f", {k.split('.')[-1]}={v}" for k, v in overrides.items())
    return {"case": "demo", "run": name, "steps": steps, "ms_per_step": 1e3 * result.time_s / steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of --repeats")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="torch intra-op thread counts to run, e.g. 1 2 (default: as is)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.json"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    tuned, load_before = prepare_run()
    rows, train_rows = [], []
    for threads in args.threads or [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        print(f"forward, masking noise, threads={threads}", flush=True)
        print(f"{'case':5} {'model':14} {'params':>8} {'ms':>9} {'min ms':>9} {'x oracle':>9}", flush=True)
        for name, c in CASES.items():
            for r in forward_case(name, c, repeats):
                rows.append({"threads": threads, **r})
                params = f"{r['params']:8d}" if r["params"] is not None else "       -"
                print(f"{name:5} {r['model']:14} {params} {r['ms']:9.2f} {r['ms_min']:9.2f} {r['x_oracle']:9.2f}", flush=True)
        print(f"training, demo GHM, batch {TRAIN_BATCH}, nll + AdamW, threads={threads}", flush=True)
        print(f"{'run':28} {'ms/step':>9} {'min ms':>9} {'steps/s':>9}", flush=True)
        for r in training(repeats):
            train_rows.append({"threads": threads, **r})
            print(f"{r['run']:28} {r['ms_per_step']:9.2f} {r['ms_per_step_min']:9.2f} {r['steps_per_s']:9.1f}", flush=True)
        steps = 100 if args.quick else 300
        # the demo's cells at n = 8192, batch 256: one-hot targets, and soft targets from the training set
        for overrides in ({}, {"data.n_train": 8192, "optim.batch_size": 256},
                          {"data.n_train": 8192, "optim.batch_size": 256, "noise.target": "empirical"}):
            loop = train_loop(steps, **overrides)
            train_rows.append({"threads": threads, **loop})
            print(f"{loop['run']:24} {loop['ms_per_step']:9.2f}", flush=True)
    result = {
        "benchmark": "learned denoisers vs the BP oracle: forward ms (masking noise) and training ms/step",
        "repeats": repeats, "statistic": "median (and min) of interleaved rounds after one warm-up",
        "width": WIDTH, "forward": rows, "training": train_rows,
        "machine": machine_info(malloc_tuned=tuned, loadavg_1min_before_after=[load_before, os.getloadavg()[0]],
                                device=str(DEVICE),
                                gpu=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
