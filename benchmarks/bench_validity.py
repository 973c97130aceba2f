"""Validity of oracle samples vs step count: where factorised (per-leaf) reverse steps stop being exact.

On the demo GHM (RHM v=8, m=2, s=2, L=4; 16 leaves) the exact BP oracle samples through
hdiff's discrete schedulers with per-leaf x0 draws ("marginal" mode): masking with Bernoulli
(MDLM) and fixed-count unmasking, and uniform noise; plus joint-x0 mode. Every invalid sample is
the sampler's error, never the denoiser's. Writes ``benchmarks/results/validity.json``.

Run: ``.venv/bin/python benchmarks/bench_validity.py [--num 2000]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from hdiff.denoisers import BPDenoiser  # noqa: E402
from hdiff.ghm import GHM  # noqa: E402
from hdiff.noise import MaskingProcess, UniformProcess  # noqa: E402
from hdiff.runtime import keep_freed_memory  # noqa: E402
from hdiff.sampling import sample  # noqa: E402
from hdiff.schedulers import make_scheduler  # noqa: E402

CASES = [  # (label, process class, scheduler name, unmasking, x0_mode, step counts)
    ("masking, bernoulli (MDLM)", MaskingProcess, "masked", "bernoulli", "marginal", [4, 16, 64, 256, 1000]),
    ("masking, fixed count", MaskingProcess, "masked", "fixed", "marginal", [4, 8, 16]),
    ("uniform", UniformProcess, "uniform", "bernoulli", "marginal", [4, 16, 64, 256, 1000]),
    ("masking, joint x0", MaskingProcess, "masked", "bernoulli", "joint", [1, 4]),
    ("uniform, joint x0", UniformProcess, "uniform", "bernoulli", "joint", [1, 4]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=2000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "validity.json"))
    args = parser.parse_args()
    keep_freed_memory()
    ghm = GHM.random_hierarchy(8, 2, 2, 4, seed=0)
    rows = []
    for label, process_cls, sched, unmasking, mode, steps_list in CASES:
        for steps in steps_list:
            x = sample(BPDenoiser(ghm, process_cls(8)), make_scheduler(sched, unmasking=unmasking),
                       batch_size=args.num, num_inference_steps=steps, x0_mode=mode,
                       generator=torch.Generator().manual_seed(0))
            valid = float(torch.isfinite(ghm.log_prob(x)).float().mean())
            rows.append({"sampler": label, "steps": steps, "valid_fraction": valid})
            print(f"{label:>26} {steps:>5} steps: {100 * valid:5.1f}% valid", flush=True)
    result = {"ghm": "RHM v=8, m=2, s=2, L=4 (16 leaves), seed 0", "num_samples": args.num, "rows": rows,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json.tmp").write_text(json.dumps(result, indent=2))
    os.replace(out.with_suffix(".json.tmp"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
