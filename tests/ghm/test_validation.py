"""Every invalid GHM spec raises ValueError whose message names the offending field."""

from __future__ import annotations

import math

import pytest
import torch

from hdiff.ghm import GHM, FactorizedKernel, ProductionKernel, random_factorized, random_hierarchy

F64 = torch.float64
RULES = torch.tensor([[[0, 1], [1, 1]], [[1, 0], [0, 0]]])  # (2 parents, 2 rules, s=2) over 2 symbols
W = torch.full((2, 2), 0.5, dtype=F64)
T = torch.full((2, 2, 2), 0.5, dtype=F64)  # (s, parents, children)
PRIOR = torch.tensor([0.5, 0.5], dtype=F64)


def _w(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def _t(fill: float = 0.5, at=None, value=None, shape=(2, 2, 2)) -> torch.Tensor:
    t = torch.full(shape, fill, dtype=F64)
    if at is not None:
        t[at] = value
    return t


def _fk() -> FactorizedKernel:
    return FactorizedKernel(T)


BAD_SPECS = {
    # ProductionKernel
    "weights-negative": (lambda: ProductionKernel(RULES, _w([1.5, -0.5], [0.5, 0.5])), "weights"),
    "weights-unnormalised": (lambda: ProductionKernel(RULES, _w([0.5, 0.4], [0.5, 0.5])), "weights"),
    "weights-nan": (lambda: ProductionKernel(RULES, _w([math.nan, 0.5], [0.5, 0.5])), "weights"),
    "weights-inf": (lambda: ProductionKernel(RULES, _w([math.inf, 0.5], [0.5, 0.5])), "weights"),
    "weights-shape": (lambda: ProductionKernel(RULES, torch.full((2, 3), 1 / 3, dtype=F64)), "weights"),
    "weights-int": (lambda: ProductionKernel(RULES, torch.ones(2, 2, dtype=torch.long)), "weights"),
    "rules-float": (lambda: ProductionKernel(RULES.double(), W), "rules"),
    "rules-2d": (lambda: ProductionKernel(RULES[0], W[0]), "rules"),
    "rules-4d": (lambda: ProductionKernel(RULES[None], W[None]), "rules"),
    "rules-empty": (lambda: ProductionKernel(RULES[:, :0], W[:, :0]), "rules"),
    "rules-branching-1": (lambda: ProductionKernel(RULES[..., :1], W), "rules"),
    "rules-negative": (lambda: ProductionKernel(RULES - 1, W), "rules"),
    "rules-too-big": (lambda: ProductionKernel(RULES, W, num_children=1), "rules"),
    "num_children-zero": (lambda: ProductionKernel(RULES, W, num_children=0), "num_children"),
    # FactorizedKernel
    "transitions-negative": (lambda: FactorizedKernel(_t(at=(0, 0), value=torch.tensor([1.5, -0.5], dtype=F64))),
                             "transitions"),
    "transitions-unnormalised": (lambda: FactorizedKernel(_t(0.4)), "transitions"),
    "transitions-nan": (lambda: FactorizedKernel(_t(at=(1, 1, 0), value=math.nan)), "transitions"),
    "transitions-2d": (lambda: FactorizedKernel(T[0]), "transitions"),
    "transitions-branching-1": (lambda: FactorizedKernel(T[:1]), "transitions"),
    "transitions-int": (lambda: FactorizedKernel(torch.ones(2, 2, 1, dtype=torch.long)), "transitions"),
    # GHM
    "root_prior-negative": (lambda: GHM(_w(1.5, -0.5), [_fk()]), "root_prior"),
    "root_prior-unnormalised": (lambda: GHM(_w(0.3, 0.3), [_fk()]), "root_prior"),
    "root_prior-nan": (lambda: GHM(_w(math.nan, 0.5), [_fk()]), "root_prior"),
    "root_prior-2d": (lambda: GHM(PRIOR[None], [_fk()]), "root_prior"),
    "root_prior-int": (lambda: GHM(torch.tensor([1, 0]), [_fk()]), "root_prior"),
    "root_prior-size": (lambda: GHM(torch.full((3,), 1 / 3, dtype=F64), [_fk()]), "root_prior"),
    "kernels-empty": (lambda: GHM(PRIOR, []), "kernels"),
    "kernels-not-a-kernel": (lambda: GHM(PRIOR, [T]), "kernels"),
    "kernels-vocabularies": (lambda: GHM(PRIOR, [FactorizedKernel(_t(1 / 3, shape=(2, 2, 3))), _fk()]), "kernels"),
    "kernels-vocabularies-production": (
        lambda: GHM(PRIOR, [ProductionKernel(RULES, W, num_children=3), _fk()]), "kernels"),
    "kernels-branching": (lambda: GHM(PRIOR, [_fk(), FactorizedKernel(_t(shape=(3, 2, 2)))]), "branching"),
    "layout-unknown": (lambda: GHM(PRIOR, [_fk()], layout="grid"), "layout"),
    "layout-image-branching": (lambda: GHM(PRIOR, [_fk()], layout="image"), "layout"),
    # random families
    "num_rules-too-many": (lambda: random_hierarchy(3, 4, 2, 2), "num_rules"),
    "num_rules-too-many-s3": (lambda: GHM.random_hierarchy(2, 5, 3, 2), "num_rules"),
    "num_rules-zero": (lambda: random_hierarchy(3, 0, 2, 2), "num_rules"),
    "num_classes-too-many": (lambda: random_hierarchy(2, 2, 2, 2, num_classes=3), "num_classes"),
    "vocab_size-zero": (lambda: random_hierarchy(0, 1, 2, 2), "vocab_size"),
    "depth-zero": (lambda: random_hierarchy(3, 2, 2, 0), "depth"),
    "depth-float": (lambda: random_hierarchy(3, 2, 2, 2.0), "depth"),
    "branching-one": (lambda: random_hierarchy(3, 1, 1, 2), "branching"),
    "rhm-image-branching": (lambda: random_hierarchy(3, 2, 2, 2, layout="image"), "layout"),
    "rhm-layout-unknown": (lambda: random_hierarchy(3, 2, 2, 2, layout="tree"), "layout"),
    "rule_probs-unknown": (lambda: random_hierarchy(3, 2, 2, 2, rule_probs="geometric"), "rule_probs"),
    "fac-image-branching": (lambda: random_factorized(3, 2, 2, layout="image"), "layout"),
    "concentration-zero": (lambda: random_factorized(3, 2, 2, concentration=0.0), "concentration"),
    "concentration-nan": (lambda: GHM.random_factorized(3, 2, 2, concentration=math.nan), "concentration"),
    "fac-num_classes-zero": (lambda: random_factorized(3, 2, 2, num_classes=0), "num_classes"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_raises_value_error_naming_the_field(case):
    build, field = BAD_SPECS[case]
    with pytest.raises(ValueError, match=field):
        build()


def test_boundary_specs_are_accepted():
    """The limits themselves are valid: m = v**(s-1), num_classes * m = v**s, a zero weight, image with s=4."""
    ghm = random_hierarchy(3, 3, 2, 2, num_classes=3, seed=0)
    assert ghm.kernels[0].num_rules == 3
    ProductionKernel(RULES, _w([1.0, 0.0], [0.0, 1.0]))
    GHM(PRIOR, [FactorizedKernel(_t(0.5, shape=(4, 2, 2)))], layout="image")
    GHM(_w(1.0, 0.0), [ProductionKernel(RULES, W, num_children=2)])
    GHM(PRIOR, [ProductionKernel(RULES, W * (1 + 1e-9))])  # within the normalisation tolerance


# --------------------------------------------------------------------------------- tokens
GHM_SEQ = GHM.random_hierarchy(3, 2, 2, 2, seed=0)
GHM_IMG = GHM.random_hierarchy(3, 2, 4, 1, layout="image", seed=0)
BAD_TOKENS = {
    "too-big": (GHM_SEQ, torch.tensor([[0, 1, 2, 3]])),
    "negative": (GHM_SEQ, torch.tensor([[0, -1, 2, 1]])),
    "too-long": (GHM_SEQ, torch.zeros(2, 5, dtype=torch.long)),
    "no-batch": (GHM_SEQ, torch.zeros(4, dtype=torch.long)),
    "float": (GHM_SEQ, torch.zeros(2, 4)),
    "bool": (GHM_SEQ, torch.zeros(2, 4, dtype=torch.bool)),
    "list": (GHM_SEQ, [[0, 1, 2, 0]]),
    "image-flat": (GHM_IMG, torch.zeros(2, 4, dtype=torch.long)),
    "image-too-big": (GHM_IMG, torch.full((1, 2, 2), 3)),
    "image-transposed-shape": (GHM_IMG, torch.zeros(2, 2, 3, dtype=torch.long)),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_log_prob_rejects_bad_tokens(case):
    ghm, x = BAD_TOKENS[case]
    with pytest.raises(ValueError, match=r"^x\b"):
        ghm.log_prob(x)


@pytest.mark.parametrize("n", [-1, 2.0, "3"])
def test_sample_rejects_bad_n(n):
    with pytest.raises(ValueError, match=r"^n\b"):
        GHM_SEQ.sample(n)


# ------------------------------------------------------------------------------ persistence
def test_load_from_an_empty_directory(tmp_path):
    with pytest.raises(ValueError, match="no saved GHM"):
        GHM.load(tmp_path)
    with pytest.raises(ValueError, match="no saved GHM"):
        GHM.load(tmp_path / "missing")


def test_load_rejects_unknown_format_and_kernel_type(tmp_path):
    import json

    GHM_SEQ.save(tmp_path)
    meta = json.loads((tmp_path / "ghm.json").read_text())
    (tmp_path / "ghm.json").write_text(json.dumps({**meta, "format": "other/9"}))
    with pytest.raises(ValueError, match="format"):
        GHM.load(tmp_path)
    meta["kernels"][1]["type"] = "lstm"
    (tmp_path / "ghm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"kernels\[1\]\.type"):
        GHM.load(tmp_path)
