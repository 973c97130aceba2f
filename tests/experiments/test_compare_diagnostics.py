"""``hdiff compare`` diagnostics: gap decomposition, training-time axis, message probes, BP U-Net rows."""

import json

import pytest

from hdiff.experiments.compare import run_compare
from hdiff.experiments.compare_config import compare_config_from_dict
from hdiff.experiments.diagnostics import decompose

from .test_compare import TINY


def _config(**compare):
    return {**TINY, "optim": {**TINY["optim"], "schedule": "constant"},
            "compare": {**TINY["compare"], "kl_samples": 16, **compare}}


def test_diagnostics_end_to_end(tmp_path):
    cfg = compare_config_from_dict(_config(decomposition="fresh_rb", snapshots=2, snapshot_samples=16, probes=True,
                                           probe_samples=16, probe_bins=2, reference_bp_unet=True,
                                           models=[{"kind": "bp_unet", "lr": 0.05}]))
    out = tmp_path / "out"
    metrics = run_compare(cfg, out, progress=False)
    rows, diag = metrics["rows"], metrics["diagnostic_rows"]
    assert {(r["n"], r["denoiser"]) for r in rows} == {(n, d) for n in (8, 32)
                                                       for d in ("tree_unet", "bp_unet", "bp_unet_ghm", "oracle")}
    # the fresh runs: one per kind, shared by every n (its snapshot at each n's budget)
    assert {(r["n"], r["data"], r["steps"]) for r in diag} == {(8, "fresh", 12), (32, "fresh", 20),
                                                               (8, "fresh_rb", 12), (32, "fresh_rb", 20)}
    runs = sorted(p.name.split("-")[0] for p in (out / "runs").iterdir())
    assert runs == ["bp_unet_n32", "bp_unet_n8", "tree_unet+fresh_n32", "tree_unet+fresh_rb_n32",
                    "tree_unet_n32", "tree_unet_n8"]
    parts = decompose(rows + diag)
    assert [(p["denoiser"], p["n"]) for p in parts] == [("tree_unet", 8), ("tree_unet", 32)]
    for p in parts:
        assert p["kl_n"] == pytest.approx(p["estimation"] + p["target_noise"] + p["approx_optim"])
        assert p["dominant"] in ("estimation", "target_noise", "approx_optim")
    reference = [r for r in rows if r["denoiser"] == "bp_unet_ghm"]
    assert all(r["kl_mean"] < 1e-5 and r["fixed.validity"] == 1.0 for r in reference)  # the construction is BP
    tree = [r for r in rows if r["denoiser"] == "tree_unet"]
    for r in tree:
        steps = [p["step"] for p in r["time_axis"]]
        assert steps == sorted(steps) and steps[-1] == r["steps"] and len(steps) == 3
        assert len(r["probes"]["encoder_r2"]) == 3 and len(r["probes"]["decoder_r2"]) == 4
    for f in ("decomposition.png", "time_axis.png", "probes.png"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "Where the gap comes from" in report and "Does the network compute BP?" in report
    assert "Where the gap comes from" in (out / "report.html").read_text()
    # a rerun reuses every cell, diagnostic ones included
    again = run_compare(cfg, out, progress=False)
    assert again["cells_skipped"] == len(rows) + len(diag)


def test_decomposition_needs_a_constant_schedule():
    with pytest.raises(ValueError, match="optim.schedule"):
        compare_config_from_dict({**TINY, "compare": {**TINY["compare"], "decomposition": "fresh"}})
    with pytest.raises(ValueError, match="compare.models"):
        compare_config_from_dict(_config(models=[{"kind": "tree_unet"}]))
