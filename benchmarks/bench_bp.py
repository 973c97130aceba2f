"""Belief-propagation speed: ms per ``hdiff.bp.posterior`` call on four GHMs, against two baselines.

Cases (random soft evidence: a GHM sample sent through a Gaussian channel, noise std 1, as float32
leaf log-likelihoods ``onehot(x) + N(0, 1)``):

- B1 sequence RHM v=16, m=4, s=2, L=8 (256 leaves), batch 256
- B2 sequence RHM v=32, m=8, s=2, L=6 (64 leaves), batch 256
- B3 image RHM v=8, m=4, s=4, L=5 (32x32 leaves), batch 64
- B4 sequence factorized GHM v=16, s=2, L=10 (1024 leaves), batch 64

Each case times, in the same process, (1) ``posterior(ghm, log_lik)`` (leaf marginals + log-evidence),
(2) a straightforward BP written here (probability space, per-node normalisation; per level: gather
the children's messages for every rule, multiply, sum; scatter the rule posteriors back down; an
einsum per level for factorized kernels), checked against hdiff (leaf marginals and log-evidence)
before timing, and (3) with ``--published PATH``, the BP of the RHM papers, ``BpRhm`` from
AntonioScl/minimal_diffusion_rhm (``datasets/BP_utils.py``; never vendored here), on B1 and B2 with
hdiff's rules and the same evidence (its ``run_BP_from_upward_messages``, which returns every level's
marginals; hdiff's ``levels=True`` time is recorded next to it). On the production-kernel cases
(B1-B3) it also times hdiff's opt-in compiled path, ``posterior(..., compiled=True)``
(``hdiff.bp.compiled``), checked against the eager result first; its one-off compile time is
recorded apart (``compile_s``) and never enters the per-call times (``--no-compiled`` skips it).
It also times B1 at batch 64..512 and B1-like RHMs at depth 6..9 (batch 64) to show that the cost
is linear in batch and leaves.

Timing: one warm-up call each, then ``--repeats`` rounds in which the implementations of a case run
one after the other (time.perf_counter, ``torch.inference_mode``, torch's thread count left as is);
the table shows medians, the JSON also the minima and the load average. Writes ``benchmarks/results/bp.json``.

Run: ``.venv/bin/python benchmarks/bench_bp.py [--quick] [--no-compiled] [--published /path/to/minimal_diffusion_rhm]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench, machine_info, prepare_run, write_result  # noqa: E402

from hdiff.bp import posterior
from hdiff.ghm import GHM
from hdiff.ghm.kernels import FactorizedKernel, ProductionKernel

CASES: dict[str, dict[str, Any]] = {
    "B1": dict(kind="rhm", v=16, m=4, s=2, L=8, batch=256, layout="sequence"),
    "B2": dict(kind="rhm", v=32, m=8, s=2, L=6, batch=256, layout="sequence"),
    "B3": dict(kind="rhm", v=8, m=4, s=4, L=5, batch=64, layout="image"),
    "B4": dict(kind="factorized", v=16, m=None, s=2, L=10, batch=64, layout="sequence"),
}
TOLERANCE = 1e-4
DEVICE = torch.device("cpu")  # --device: where the GHMs and the evidence live (built on the CPU, then moved)


def timed(fns: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
    """On CUDA, each call waits for the GPU to finish (kernels are asynchronous), so the times are real."""
    if DEVICE.type != "cuda":
        return fns
    return {k: (lambda f=f: (f(), torch.cuda.synchronize(DEVICE))) for k, f in fns.items()}


def make_ghm(c: dict[str, Any], depth: int | None = None) -> GHM:
    L = c["L"] if depth is None else depth
    if c["kind"] == "rhm":
        return GHM.random_hierarchy(c["v"], c["m"], c["s"], L, layout=c["layout"], seed=0)
    return GHM.random_factorized(c["v"], c["s"], L, layout=c["layout"], seed=0)


def soft_evidence(ghm: GHM, batch: int, seed: int = 1) -> torch.Tensor:
    """``(B, *leaf_shape, v)`` float32 log-likelihoods of a GHM sample seen through N(0, 1) noise."""
    g = torch.Generator().manual_seed(seed)
    x = ghm.sample(batch, generator=g)
    y = torch.nn.functional.one_hot(x, ghm.vocab_size).float()
    return y + torch.randn(y.shape, generator=g)


# ---------------------------------------------------------------- straightforward reference BP
def group(x: torch.Tensor, layout: str, s: int) -> torch.Tensor:
    """Level tensor ``(B, *level_shape, C)`` -> ``(B, N_parent, s, C)``, parents in flat layout order."""
    if layout == "sequence":
        return x.reshape(x.shape[0], -1, s, x.shape[-1])
    B, H, W, C = x.shape  # image: a parent's 4 children are its 2x2 block, child j at (j // 2, j % 2)
    return x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, -1, 4, C)


def ungroup(x: torch.Tensor, layout: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`group`: ``(B, N_parent, s, C)`` -> ``(B, *shape, C)``."""
    B, C = x.shape[0], x.shape[-1]
    if layout == "sequence":
        return x.reshape(B, *shape, C)
    h = shape[0] // 2
    return x.reshape(B, h, h, 2, 2, C).permute(0, 1, 3, 2, 4, 5).reshape(B, *shape, C)


def naive_posterior(ghm: GHM, log_lik: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leaf marginals ``(B, *leaf_shape, v)`` and log-evidence ``(B,)``; one upward and one downward pass."""
    B, s, layout = log_lik.shape[0], ghm.branching, ghm.layout
    log_z = log_lik.logsumexp(-1).reshape(B, -1).sum(1)
    u = log_lik.softmax(-1)  # leaf messages, normalised per node
    ups, saved = [u], []
    for level in reversed(range(ghm.depth)):
        k, child = ghm.kernels[level], group(u, layout, s)  # (B, N, s, C)
        if isinstance(k, ProductionKernel):
            R = k.rules
            terms = k.weights.float() * torch.stack([child[:, :, j, R[:, :, j]] for j in range(s)], -1).prod(-1)
            parent, keep = terms.sum(-1), terms  # terms: (B, N, A, m)
        else:
            msgs = torch.einsum("bnjc,jac->bnja", child, k.transitions.float())  # (B, N, s, A)
            parent, keep = msgs.prod(2), msgs
        z = parent.sum(-1, keepdim=True)
        log_z = log_z + z.log().reshape(B, -1).sum(1)
        u = (parent / z).reshape(B, *ghm.level_shape(level), -1)
        ups.append(u)
        saved.append(keep)
    joint = ghm.root_prior.float() * u.reshape(B, -1)
    log_z = log_z + joint.sum(-1).log()
    p = (joint / joint.sum(-1, keepdim=True)).reshape(B, 1, -1)  # (B, N=1, A)
    for level in range(ghm.depth):
        k, keep, child = ghm.kernels[level], saved[ghm.depth - 1 - level], group(ups[ghm.depth - 1 - level], layout, s)
        if isinstance(k, ProductionKernel):  # posterior of each (parent symbol, rule), scattered to the children
            q = (keep * (p / keep.sum(-1).clamp_min(1e-38)).unsqueeze(-1)).flatten(2)  # (B, N, A*m)
            out = torch.stack([child.new_zeros(child.shape[:2] + child.shape[3:]).index_add_(
                2, k.rules[:, :, j].flatten(), q) for j in range(s)], 2)  # (B, N, s, C)
        else:  # child j: its own message times the parent's posterior divided by child j's contribution
            out = child * torch.einsum("bnja,jac->bnjc", p.unsqueeze(2) / keep.clamp_min(1e-38), k.transitions.float())
            out = out / out.sum(-1, keepdim=True)
        p = ungroup(out, layout, ghm.level_shape(level + 1)).reshape(B, -1, out.shape[-1])
    return p.reshape(log_lik.shape), log_z


# ---------------------------------------------------------------- published BpRhm (optional)
def load_published(path: str) -> tuple[type, str]:
    """``BpRhm`` from a checkout of AntonioScl/minimal_diffusion_rhm (repo root or BP_utils.py)."""
    file = Path(path) / "datasets" / "BP_utils.py" if Path(path).is_dir() else Path(path)
    spec = importlib.util.spec_from_file_location("published_bp_utils", file)  # its package name clashes with HF datasets
    assert spec is not None and spec.loader is not None, f"cannot import {file}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BpRhm, hashlib.sha256(file.read_bytes()).hexdigest()


def published_call(bp_cls: type, ghm: GHM, log_lik: torch.Tensor) -> Callable[[], Any]:
    """A zero-argument call of ``BpRhm.run_BP_from_upward_messages`` on this evidence (needs num_classes == v)."""
    k0 = ghm.kernels[0]
    bp = bp_cls(ghm.vocab_size, ghm.branching, k0.num_rules, ghm.depth,
                {level: k.rules.clone() for level, k in enumerate(ghm.kernels)})
    nu = log_lik.softmax(-1).reshape(-1, ghm.vocab_size).T.contiguous()  # (v, B * d), batch-major columns
    return lambda: bp.run_BP_from_upward_messages(nu)


# ---------------------------------------------------------------- timing
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def run_case(name: str, c: dict[str, Any], repeats: int, published: tuple[type, str] | None,
             compiled: bool = True) -> dict[str, Any]:
    ghm = make_ghm(c)
    ll = soft_evidence(ghm, c["batch"])
    ghm, ll = ghm.to(DEVICE), ll.to(DEVICE)
    ref = posterior(ghm, ll)
    marg, log_ev = naive_posterior(ghm, ll)
    diff = max_diff(marg, ref.leaf_marginals)
    ev_diff = float(((log_ev.double() - ref.log_evidence.double()).abs() / ref.log_evidence.double().abs()).max())
    if diff >= TOLERANCE or ev_diff >= TOLERANCE:
        raise RuntimeError(f"{name}: reference BP disagrees with hdiff (marginals {diff:.2e}, log-evidence rel {ev_diff:.2e})")
    row: dict[str, Any] = {"case": name, **{k: c[k] for k in ("kind", "layout", "v", "m", "s", "L", "batch")},
                           "leaves": ghm.num_leaves, "max_abs_diff_naive": diff, "rel_diff_log_evidence_naive": ev_diff}
    fns: dict[str, Callable[[], Any]] = {"hdiff": lambda: posterior(ghm, ll), "naive": lambda: naive_posterior(ghm, ll)}
    row.update(max_abs_diff_published=None)
    if published is not None and name in ("B1", "B2") and DEVICE.type == "cpu":
        call = published_call(published[0], ghm, ll)
        leaf = call()[ghm.depth]  # (v, B * d)
        row["max_abs_diff_published"] = max_diff(leaf.T.reshape(ref.leaf_marginals.shape), ref.leaf_marginals)
        if row["max_abs_diff_published"] >= TOLERANCE:
            print(f"warning: {name}: published BP differs from hdiff by {row['max_abs_diff_published']:.2e}", flush=True)
        fns.update(published=call, hdiff_all_levels=lambda: posterior(ghm, ll, levels=True))
    row.update(compile_s=None, max_abs_diff_compiled=None)
    if compiled and c["kind"] == "rhm":
        start = time.perf_counter()
        comp = posterior(ghm, ll, compiled=True)  # the first call compiles: timed apart, never in the rounds
        posterior(ghm, ll[: max(1, c["batch"] // 2)], compiled=True)  # a second shape: the dynamic-shape graphs
        row["compile_s"] = time.perf_counter() - start
        row["max_abs_diff_compiled"] = max_diff(comp.leaf_marginals, ref.leaf_marginals)
        ev_c = float(((comp.log_evidence.double() - ref.log_evidence.double()).abs() / ref.log_evidence.double().abs()).max())
        if row["max_abs_diff_compiled"] >= TOLERANCE or ev_c >= TOLERANCE:
            raise RuntimeError(f"{name}: compiled BP disagrees with eager ({row['max_abs_diff_compiled']:.2e}, {ev_c:.2e})")
        fns["hdiff_compiled"] = lambda: posterior(ghm, ll, compiled=True)
    t = bench(timed(fns), repeats)
    for key in ("hdiff", "naive", "published", "hdiff_all_levels", "hdiff_compiled"):
        row[f"{key}_ms"] = t[key]["median"] if key in t else None
        row[f"{key}_min_ms"] = t[key]["min"] if key in t else None
    row["samples_per_s"] = 1e3 * c["batch"] / row["hdiff_ms"]
    row["speedup_vs_naive"] = row["naive_ms"] / row["hdiff_ms"]
    row["speedup_vs_published"] = row["published_ms"] / row["hdiff_ms"] if row["published_ms"] else None
    row["speedup_vs_published_compiled"] = (row["published_ms"] / row["hdiff_compiled_ms"]
                                            if row["published_ms"] and row["hdiff_compiled_ms"] else None)
    return row


def scaling(repeats: int) -> dict[str, list[dict[str, float]]]:
    """hdiff ms on B1 at batch 64..512 and on B1-like RHMs at depth 6..9 (batch 64)."""
    b1 = CASES["B1"]
    ghm = make_ghm(b1)
    setups: list[tuple[str, GHM, int]] = [(f"batch={b}", ghm, b) for b in (64, 128, 256, 512)]
    setups += [(f"depth={d}", make_ghm(b1, d), 64) for d in (6, 7, 8, 9)]
    inputs = {name: (g.to(DEVICE), soft_evidence(g, b).to(DEVICE)) for name, g, b in setups}
    t = bench(timed({name: (lambda g=g, ll=ll: posterior(g, ll)) for name, (g, ll) in inputs.items()}), repeats)
    rows = [{"batch": b, "depth": g.depth, "leaves": g.num_leaves, "ms": t[name]["median"], "min_ms": t[name]["min"],
             "us_per_leaf": 1e3 * t[name]["median"] / (b * g.num_leaves)} for name, g, b in setups]
    by_batch, by_depth = rows[:4], rows[4:]
    return {"batch": by_batch, "depth": by_depth}


def fmt(x: float | None, spec: str = "9.2f") -> str:
    return format(x, spec) if x is not None else " " * (int(spec.split(".")[0]) - 1) + "-"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of --repeats")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--published", default=None, help="checkout of AntonioScl/minimal_diffusion_rhm (or its BP_utils.py)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the published BP runs on the CPU only)")
    parser.add_argument("--no-compiled", action="store_true", help="skip hdiff's opt-in compiled path (torch.compile)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bp.json"))
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    tuned, load_before = prepare_run()
    published = None
    if args.published and Path(args.published).exists():
        published = load_published(args.published)
    elif args.published:
        print(f"--published {args.published}: not found, skipping the published BP", flush=True)
    rows = []
    print(f"{'case':4} {'model':38} {'hdiff ms':>9} {'samples/s':>10} {'naive ms':>9} {'x naive':>8} "
          f"{'publ. ms':>9} {'x publ.':>8} {'hdiff lvls':>10} {'compiled':>9} {'x publ.':>8}", flush=True)
    with torch.inference_mode():
        for name, c in CASES.items():
            r = run_case(name, c, repeats, published, compiled=not args.no_compiled)
            rows.append(r)
            model = (f"{c['layout']} {c['kind']} v={c['v']}" + (f" m={c['m']}" if c["m"] else "")
                     + f" s={c['s']} L={c['L']} B={c['batch']}")
            print(f"{name:4} {model:38} {r['hdiff_ms']:9.2f} {r['samples_per_s']:10.0f} {r['naive_ms']:9.2f} "
                  f"{r['speedup_vs_naive']:8.1f} {fmt(r['published_ms'])} {fmt(r['speedup_vs_published'], '8.1f')} "
                  f"{fmt(r['hdiff_all_levels_ms'], '10.2f')} {fmt(r['hdiff_compiled_ms'])} "
                  f"{fmt(r['speedup_vs_published_compiled'], '8.1f')}", flush=True)
        scale = scaling(repeats)
    print("scaling (hdiff, B1 model):", flush=True)
    for r in scale["batch"]:
        print(f"  batch {r['batch']:4} L=8: {r['ms']:8.2f} ms  ({r['us_per_leaf']:.4f} us per batch*leaf)")
    for r in scale["depth"]:
        print(f"  batch   64 L={r['depth']}: {r['ms']:8.2f} ms  ({r['us_per_leaf']:.4f} us per batch*leaf)")
    result = {
        "benchmark": "ms per hdiff.bp.posterior call (leaf marginals + log-evidence), float32 soft evidence; "
                     "hdiff_compiled_ms: posterior(..., compiled=True) after its one-off compile (compile_s)",
        "repeats": repeats, "statistic": "median (and min) of interleaved rounds after one warm-up", "cases": rows, "scaling": scale,
        "published": {"source": "github.com/AntonioScl/minimal_diffusion_rhm datasets/BP_utils.py BpRhm"
                      ".run_BP_from_upward_messages (all levels' marginals)",
                      "path": args.published if published else None, "sha256": published[1] if published else None},
        "machine": machine_info(cpu=cpu_model(), malloc_tuned=tuned, device=str(DEVICE),
                                gpu=torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else None,
                                loadavg_1min_before_after=[load_before, os.getloadavg()[0]],
                                loadavg_1_5_15_after=list(os.getloadavg())),
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
