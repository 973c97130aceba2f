"""Oracle reverse diffusion speed: 1000 samples x 100 steps on the demo GHM (RHM v=8, m=2, s=2, L=4).

For masking (hdiff's MaskedDiffusionScheduler), uniform noise (UniformDiffusionScheduler) and
Gaussian noise (diffusers' DDIMScheduler) it measures the wall time of one
``hdiff.sampling.sample`` call and the share spent inside the BP denoiser, and writes
``benchmarks/results/sampling.json``. Target (issue 3): each under 10 s on the 2-core CI machine.

Run: ``.venv/bin/python benchmarks/bench_sampling.py [--num 1000] [--steps 100] [--device cuda]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, write_result  # noqa: E402

from hdiff.denoisers import BPDenoiser  # noqa: E402
from hdiff.ghm import GHM  # noqa: E402
from hdiff.noise import GaussianProcess, MaskingProcess, UniformProcess  # noqa: E402
from hdiff.runtime import keep_freed_memory  # noqa: E402
from hdiff.sampling import sample  # noqa: E402
from hdiff.schedulers.factory import make_scheduler  # noqa: E402


class TimedDenoiser:
    """Forwards to a denoiser and adds up the seconds spent in it."""

    def __init__(self, inner: BPDenoiser) -> None:
        self.inner, self.process, self.leaf_shape, self.seconds = inner, inner.process, inner.leaf_shape, 0.0

    def __call__(self, x_t: torch.Tensor, alpha: float) -> torch.Tensor:
        start = time.perf_counter()
        out = self.inner(x_t, alpha)
        if out.is_cuda:  # kernels are asynchronous: wait for them, so the share is real
            torch.cuda.synchronize(out.device)
        self.seconds += time.perf_counter() - start
        return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the GHM, the states and the RNG live")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    args = parser.parse_args()
    tuned = keep_freed_memory()
    device = torch.device(args.device)
    ghm = GHM.random_hierarchy(8, 2, 2, 4, seed=0).to(device)
    cases = [("masking", MaskingProcess(8), "masked"), ("uniform", UniformProcess(8), "uniform"),
             ("gaussian", GaussianProcess(8), "ddim")]
    rows = []
    for name, process, sched in cases:
        den = TimedDenoiser(BPDenoiser(ghm, process))
        start = time.perf_counter()
        x = sample(den, make_scheduler(sched), batch_size=args.num, num_inference_steps=args.steps,
                   generator=torch.Generator(device).manual_seed(0), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        valid = float(torch.isfinite(ghm.log_prob(x)).float().mean())
        rows.append({"process": name, "scheduler": sched, "seconds": seconds, "denoiser_seconds": den.seconds,
                     "denoiser_share": den.seconds / seconds, "valid_fraction": valid})
        print(f"{name:>9} {sched:>8}: {seconds:6.2f} s  ({100 * den.seconds / seconds:4.1f}% in the denoiser)  "
              f"valid {100 * valid:5.1f}%", flush=True)
    result = {
        "benchmark": "oracle sampling, demo GHM (RHM v=8, m=2, s=2, L=4)",
        "num_samples": args.num, "steps": args.steps, "rows": rows,
        "machine": machine_info(malloc_tuned=tuned, device=str(device),
                                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
