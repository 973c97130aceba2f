"""Experiments: the jobs hdiff runs end to end, each with its TOML config, writers, report and plots.

- :mod:`~hdiff.experiments.compare`: the main job (oracle vs learned denoisers as n grows).
- :mod:`~hdiff.experiments.classify`: root classification vs n (ConvNet, MLP, Bayes).
- :mod:`~hdiff.experiments.probe`: forward-backward experiments with the exact oracle.
- :mod:`~hdiff.experiments.demo`: a quick look at the default GHM.
"""

from hdiff.experiments.demo import QuicklookConfig, format_summary, run_quicklook
from hdiff.experiments.plots import plot_tokens, symbol_colormap

__all__ = ["plot_tokens", "symbol_colormap", "QuicklookConfig", "run_quicklook", "format_summary"]
