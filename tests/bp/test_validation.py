"""Invalid evidence raises ValueError naming leaf_log_lik, from every BP entry point."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.bp import log_evidence, posterior, sample_posterior
from hdiff.ghm import GHM

ENTRY_POINTS = {"posterior": posterior, "log_evidence": log_evidence, "sample_posterior": sample_posterior}


def _ghms() -> dict[str, GHM]:
    return {"sequence": GHM.random_hierarchy(3, 2, 2, 2, seed=0),
            "image": GHM.random_factorized(3, 4, 1, layout="image", seed=0)}


def _bad_inputs(ghm: GHM) -> dict[str, torch.Tensor]:
    good = torch.zeros(2, *ghm.leaf_shape, ghm.vocab_size)
    nan, pinf = good.clone(), good.clone()
    nan.view(-1)[5] = math.nan
    pinf.view(-1)[3] = math.inf
    nan_with_minus_inf = nan.clone()
    nan_with_minus_inf.view(-1)[0] = -math.inf
    return {
        "no-batch-dim": good[0],
        "wrong-vocab": torch.zeros(2, *ghm.leaf_shape, ghm.vocab_size + 1),
        "wrong-leaves": torch.zeros(2, ghm.num_leaves + 1, ghm.vocab_size),
        "extra-dim": good.unsqueeze(1),
        "flat-image" if ghm.layout == "image" else "image-for-sequence":
            torch.zeros(2, ghm.num_leaves, ghm.vocab_size) if ghm.layout == "image"
            else torch.zeros(2, 2, 2, ghm.vocab_size),
        "int-dtype": good.long(),
        "bool-dtype": good.bool(),
        "nan": nan,
        "nan-with-minus-inf": nan_with_minus_inf,
        "plus-inf": pinf,
        "plus-inf-f64": pinf.double(),
        "not-a-tensor": good.tolist(),
    }


CASES = [(layout, case, fn) for layout, ghm in _ghms().items() for case in _bad_inputs(ghm) for fn in ENTRY_POINTS]


@pytest.mark.parametrize("layout,case,fn", CASES, ids=["-".join(c) for c in CASES])
def test_bad_evidence_raises_value_error_naming_leaf_log_lik(layout, case, fn):
    ghm = _ghms()[layout]
    with pytest.raises(ValueError, match="leaf_log_lik"):
        ENTRY_POINTS[fn](ghm, _bad_inputs(ghm)[case])


def test_good_evidence_of_every_kind_is_accepted():
    """The bad inputs above differ from accepted ones only in the flagged respect."""
    for ghm in _ghms().values():
        ev = torch.zeros(2, *ghm.leaf_shape, ghm.vocab_size)
        ev.view(-1)[0] = -math.inf  # -inf (hard evidence) is allowed, +inf and NaN are not
        for dtype in (torch.float32, torch.float64):
            assert torch.isfinite(posterior(ghm, ev.to(dtype)).log_evidence).all()
            assert torch.isfinite(log_evidence(ghm, ev.to(dtype))).all()
            assert sample_posterior(ghm, ev.to(dtype)).shape == (2, *ghm.leaf_shape)
