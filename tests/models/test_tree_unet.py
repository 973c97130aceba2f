"""The tree U-Net's architecture (Mei 2024), the baselines' constraints, and quick learning checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from hdiff.denoisers import BPDenoiser
from hdiff.models import RootClassifier, TreeUNet, UNet1DBaseline, UNet2DBaseline
from hdiff.denoisers.learned import LOG_SNR_MAX
from hdiff.models.tree_unet import TreeOrder
from hdiff.ghm import GHM
from hdiff.ghm.layout import from_tree_order


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """See tests/denoisers/test_learned.py: small ops on a loaded 2-core machine want one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ architecture
@pytest.mark.parametrize("layout", ["sequence", "image"])
def test_pooling_and_upsampling_are_the_tree_convs(layout):
    """Tree-order Linear layers equal Conv1d(kernel = stride = s) / Conv2d(2x2, stride 2) and their transposes."""
    torch.manual_seed(0)
    s, depth, c, c2, b = (3, 2, 5, 7, 2) if layout == "sequence" else (4, 2, 5, 7, 2)
    model = TreeUNet(vocab_size=3, branching=s, depth=depth, layout=layout, channels=[c, c2, 4])
    pool, up = model.encoder.pools[0], model.ups[-1]  # leaves -> level 1, level 1 -> leaves
    order = TreeOrder(layout, depth)
    shape = (s**depth,) if layout == "sequence" else (2**depth, 2**depth)
    x = torch.randn(b, c, *shape)
    tree = order.to_tree(x.movedim(1, -1))  # (B, N, C)
    pooled = pool(tree.reshape(b, -1, s * c))  # (B, N/s, C2), tree order of level depth - 1
    w = pool.weight.view(c2, s, c).transpose(1, 2)  # (C2, C, s): child j is kernel tap j
    if layout == "sequence":
        conv = F.conv1d(x, w, pool.bias, stride=s)
        y = torch.randn(b, c2, s ** (depth - 1))
        wt = up.weight.view(s, c, c2).permute(2, 1, 0)  # (C2, C, s)
        bias = up.bias.view(s, c).T.repeat(1, s ** (depth - 1))  # per-tap bias: child j gets bias[j]
        convt = F.conv_transpose1d(y, wt, stride=s) + bias
        lin = up(y.movedim(1, -1)).reshape(b, -1, c).movedim(-1, 1)
    else:
        conv = F.conv2d(x, w.reshape(c2, c, 2, 2), pool.bias, stride=2)  # tap j at row j // 2, column j % 2
        pooled = from_tree_order(pooled, layout, depth - 1)
        side = 2 ** (depth - 1)
        y = torch.randn(b, c2, side, side)
        wt = up.weight.view(2, 2, c, c2).permute(3, 2, 0, 1)  # (C2, C, 2, 2)
        bias = up.bias.view(2, 2, c).permute(2, 0, 1).repeat(1, side, side)  # per-tap bias
        convt = F.conv_transpose2d(y, wt, stride=2) + bias
        lin = order.from_tree(up(order_to_tree(y, depth - 1)).reshape(b, -1, c)).movedim(-1, 1)
    assert torch.allclose(pooled.movedim(-1, 1).reshape(conv.shape), conv, atol=1e-5)
    assert torch.allclose(lin, convt, atol=1e-5)


def order_to_tree(y: torch.Tensor, level: int) -> torch.Tensor:
    """Image features ``(B, C, h, h)`` -> tree order ``(B, h*h, C)``."""
    return TreeOrder("image", level).to_tree(y.movedim(1, -1)) if level > 0 else y.flatten(2).movedim(1, -1)


@pytest.mark.parametrize("layout,branching", [("sequence", 2), ("sequence", 3), ("image", 4)])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_any_depth_and_layout(layout, branching, depth):
    model = TreeUNet(vocab_size=3, process="uniform", branching=branching, depth=depth, layout=layout,
                     channels=[8] * depth + [12], noise_embedding_dim=8).eval()
    x = torch.randint(0, 3, (2, *model.leaf_shape))
    assert model(x, 0.5).shape == (2, 3, *model.leaf_shape)


def test_image_leaves_go_to_tree_order_and_back():
    """Leaf (1, 2) of a 4x4 image: level-1 block (0, 1) (j = 1), child (1, 0) in it (j = 2): tree index 4 * 1 + 2."""
    model = TreeUNet(vocab_size=3, branching=4, depth=2, layout="image", channels=8).eval()
    x = torch.zeros(1, 4, 4, dtype=torch.long)
    x[0, 1, 2] = 1
    tree = model.order.to_tree(x)
    assert model.order.from_tree(tree).equal(x)
    assert int(tree[0].argmax()) == 6


def test_noise_level_is_read_from_alpha():
    gauss = TreeUNet(vocab_size=3, process="gaussian", depth=2)
    u = gauss.signal_level(torch.tensor([0.0, 0.5, 1.0]), 3, torch.device("cpu"))
    assert torch.allclose(u, torch.tensor([0.0, 0.5, 1.0]))  # log-SNR -inf, 0, +inf clamped to +-LOG_SNR_MAX
    a = 1 / (1 + math.exp(-2.0))  # log-SNR 2
    assert float(gauss.signal_level(a, 1, torch.device("cpu"))) == pytest.approx((2 + LOG_SNR_MAX) / (2 * LOG_SNR_MAX))
    masked = TreeUNet(vocab_size=3, process="masking", depth=2)
    assert torch.equal(masked.signal_level(torch.tensor([0.2, 0.7]), 2, torch.device("cpu")), torch.tensor([0.2, 0.7]))


def test_baselines_get_a_continuous_timestep():
    """Discrete noise: timestep = 1000 (1 - alpha), never a schedule index."""
    seen = []
    for model in (UNet1DBaseline(4, "masking", depth=3, block_out_channels=(8, 16)),
                  UNet2DBaseline(4, "masking", depth=2, block_out_channels=(8, 16))):
        model.unet.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
        model(torch.full((2, *model.leaf_shape), 4), torch.tensor([0.25, 0.999]))
    for t in seen:
        assert torch.allclose(t, torch.tensor([750.0, 1.0]), atol=1e-3)


def test_unconditioned_masking_model_ignores_alpha_and_round_trips(tmp_path):
    """Masking: ``p(x0 | x_t)`` does not depend on alpha, so the model may drop the noise input (MDLM)."""
    model = TreeUNet(vocab_size=3, depth=2, channels=8, mlp_ratio=3, noise_conditioning=False)
    for block in model.decoder:
        torch.nn.init.normal_(block.fc2.weight)  # zero-initialised: make every block count
    assert not hasattr(model, "film") and model.decoder[0].fc1.out_features == 24  # hidden = 3 x 8 channels
    x = torch.tensor([[0, 3, 1, 3], [2, 2, 3, 0]])
    out = model(x, torch.tensor([0.1, 0.9]))
    assert torch.equal(out, model(x, torch.tensor([0.7, 0.2])))
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 4))
    model.save_pretrained(tmp_path)
    assert torch.equal(TreeUNet.from_pretrained(tmp_path)(x, 0.5), out)
    # with the noise input (the default) the same weights do read alpha
    conditioned = TreeUNet(vocab_size=3, depth=2, channels=8)
    for block in conditioned.decoder:
        torch.nn.init.normal_(block.fc2.weight)
    torch.nn.init.normal_(conditioned.film.weight)
    assert not torch.equal(conditioned(x, 0.1), conditioned(x, 0.9))


def test_dropout_only_in_training():
    model = TreeUNet(vocab_size=3, depth=2, channels=8, dropout=0.5)
    for block in model.decoder:
        torch.nn.init.normal_(block.fc2.weight)  # zero-initialised: make dropout visible
    x = torch.full((4, 4), 3)
    assert not torch.equal(model.train()(x, 0.0), model(x, 0.0))
    model.eval()
    assert torch.equal(model(x, 0.0), model(x, 0.0))


@pytest.mark.parametrize("kwargs", [dict(layout="image", branching=2), dict(depth=0), dict(branching=1),
                                    dict(channels=[8, 8]), dict(channels=0), dict(process="absorbing"),
                                    dict(vocab_size=1), dict(dropout=1.0), dict(noise_embedding_dim=7),
                                    dict(layout="grid"), dict(mlp_ratio=0), dict(mlp_ratio=True),
                                    dict(process="uniform", noise_conditioning=False),
                                    dict(process="gaussian", noise_conditioning=False)])
def test_tree_unet_config_errors(kwargs):
    with pytest.raises(ValueError):
        TreeUNet(**{"depth": 2, **kwargs})


@pytest.mark.parametrize("cls,kwargs", [
    (UNet1DBaseline, dict(branching=3, depth=2)),  # 9 leaves, 3 blocks halve twice
    (UNet1DBaseline, dict(depth=4, block_style="dance")),  # 16 < 24
    (UNet1DBaseline, dict(depth=5, block_style="dance", block_out_channels=(32, 64))),  # dance has 3 blocks
    (UNet1DBaseline, dict(depth=4, block_out_channels=(12, 16))),  # GroupNorm(8)
    (UNet1DBaseline, dict(depth=4, block_style="wavenet")),
    (UNet2DBaseline, dict(depth=1, block_out_channels=(8, 16, 32))),  # side 2 cannot be halved twice
    (UNet2DBaseline, dict(depth=3, block_out_channels=(8, 20))),  # not divisible by norm_num_groups
])
def test_baseline_constraints(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_baseline_lengths_that_work():
    assert UNet1DBaseline(4, depth=5, block_style="dance").eval()(torch.full((1, 32), 4), 0.0).shape == (1, 4, 32)
    assert UNet1DBaseline(4, branching=3, depth=2, block_out_channels=(8,)).eval()(torch.full((1, 9), 4), 0.0).shape == (1, 4, 9)
    assert UNet1DBaseline(4, branching=6, depth=2, block_out_channels=(8, 8, 8)).eval()(torch.full((1, 36), 4), 0.0).shape == (1, 4, 36)


# ------------------------------------------------------------------ learning
def _adamw(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=True)  # fused: one kernel instead of ~10 per tensor


def test_tree_unet_learns_a_tiny_ghm():
    """A few hundred AdamW steps of masked-diffusion NLL approach the BP oracle's held-out loss."""
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = TreeUNet(vocab_size=4, process="masking", branching=2, depth=3, channels=32, noise_embedding_dim=32)
    opt = _adamw(model, 3e-3)
    x0_test = ghm.sample(2048, generator=g)
    x_test = model.process.add_noise(x0_test, 0.5, generator=g)
    masked = x_test == model.process.mask_token

    def held_out(denoiser) -> float:
        with torch.no_grad():
            log_p = denoiser(x_test, 0.5).gather(1, x0_test.unsqueeze(1))[:, 0]
        return float(-log_p[masked].mean())

    for _ in range(250):
        x0, alpha = ghm.sample(128, generator=g), torch.rand(128, generator=g)
        loss = F.nll_loss(model(model.process.add_noise(x0, alpha, generator=g), alpha), x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    learned, oracle = held_out(model.eval()), held_out(BPDenoiser(ghm, model.process))
    log_v = math.log(4)
    assert oracle - 0.03 < learned < oracle + 0.3 * (log_v - oracle), (learned, oracle, log_v)


def test_root_classifier_shape_errors_and_round_trip(tmp_path):
    model = RootClassifier(vocab_size=3, num_classes=5, branching=4, depth=2, layout="image", channels=[8, 12, 16]).eval()
    x = torch.randint(0, 3, (6, 4, 4))
    logits = model(x)
    assert logits.shape == (6, 5) and logits.dtype == torch.float32
    assert torch.allclose(model(x[:2]), logits[:2], atol=1e-5)
    for bad in (torch.full((2, 4, 4), 3), x.float(), x[:, :2], torch.full((2, 4, 4), -1)):
        with pytest.raises(ValueError):
            model(bad)
    model.save_pretrained(tmp_path)
    assert torch.equal(RootClassifier.from_pretrained(tmp_path).eval()(x), logits)


def test_root_classifier_learns_the_root():
    ghm = GHM.random_hierarchy(4, 2, 2, 3, seed=0)  # unambiguous: the leaves determine the root
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    model = RootClassifier(vocab_size=4, num_classes=ghm.num_classes, branching=2, depth=3, channels=32)
    opt = _adamw(model, 3e-3)
    for _ in range(150):
        x, tree = ghm.sample(128, generator=g, return_tree=True)
        loss = F.cross_entropy(model(x), tree[0][:, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, tree = ghm.sample(1024, generator=g, return_tree=True)
    with torch.no_grad():
        accuracy = float((model.eval()(x).argmax(-1) == tree[0][:, 0]).float().mean())
    assert accuracy > 0.8 > 2 / ghm.num_classes, accuracy
