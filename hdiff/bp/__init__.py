"""Exact batched belief propagation on GHMs."""

from hdiff.bp.propagation import BPResult, log_evidence, posterior, row_bytes, sample_posterior, upward_messages

__all__ = ["BPResult", "posterior", "log_evidence", "sample_posterior", "upward_messages", "row_bytes"]
