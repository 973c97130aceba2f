"""The quick look behind `hdiff demo`: exact entropy, BP recovering noisy samples, files written."""

import json
import math

from hdiff.cli import main
from hdiff.experiments.demo import QuicklookConfig, format_summary, run_quicklook


def test_quicklook(tmp_path):
    cfg = QuicklookConfig(num_samples=256, alphas=[1.0, 0.5, 0.0])
    summary = run_quicklook(tmp_path, cfg)
    assert summary["valid_fraction"] == 1.0
    exact = math.log(8) + 15 * math.log(2)  # log n_c + (s^L - 1)/(s - 1) log m
    assert abs(summary["entropy_nats"] - exact) < 1e-9 and abs(-summary["mean_log_prob_nats"] - exact) < 1e-9
    clean, half, noise = summary["noise"]
    assert clean["leaf_accuracy_bp"] == 1.0 and clean["root_accuracy_bp"] == 1.0
    assert half["root_accuracy_bp"] > 0.5 > noise["root_accuracy_bp"]
    assert abs(noise["mean_log_evidence_nats"] - 16 * math.log(1 / 8)) < 1e-4  # pure noise: uniform strings
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["num_samples"] == 256
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert "exact entropy" in format_summary(summary)


def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert "valid samples 100.0%" in capsys.readouterr().out
