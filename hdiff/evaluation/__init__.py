"""Evaluation: metrics, plots and reports."""

from hdiff.evaluation.plots import plot_tokens, symbol_colormap
from hdiff.evaluation.quicklook import QuicklookConfig, format_summary, run_quicklook

__all__ = ["plot_tokens", "symbol_colormap", "QuicklookConfig", "run_quicklook", "format_summary"]
