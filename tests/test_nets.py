import pytest
import torch

from lmm.nets import MLP, UNet, build_net
from lmm.nets.unet import PositionalEmbedding

# (data_shape, channel_mult, attn_resolutions): digits, Fashion-MNIST (odd 7 at the bottom),
# CIFAR-like, ImageNet-64-like, odd sizes that are pooled with ceil, and a non-square image.
SHAPES = [
    ((1, 8, 8), [1, 2], [4]),
    ((1, 28, 28), [1, 2, 2], [7]),
    ((3, 32, 32), [1, 2, 2], [16]),
    ((3, 64, 64), [1, 2, 2, 2], [8]),
    ((1, 7, 7), [1, 2, 2], [4, 2]),
    ((3, 12, 20), [1, 2], [6]),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These nets are tiny; a single thread avoids OpenMP stalls on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_cfg(channel_mult, attn, embedding="positional", channels=8, **kw):
    cfg = dict(kind="unet", channels=channels, channel_mult=channel_mult, num_blocks=1,
               attn_resolutions=attn, dropout=0.0, embedding=embedding)
    return {**cfg, **kw}


def perturb_output(net: torch.nn.Module) -> None:
    """Give the zero-initialised output layer random weights so the net's output is informative."""
    out = net.conv_out if isinstance(net, UNet) else net.out
    with torch.no_grad():
        out.weight.normal_(std=0.1)


@pytest.mark.parametrize("embedding", ["positional", "fourier"])
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("shape,mult,attn", SHAPES)
def test_unet_shape_and_zero_init(shape, mult, attn, num_classes, embedding):
    torch.manual_seed(0)
    net = build_net(unet_cfg(mult, attn, embedding), shape, num_classes)
    x = torch.randn(3, *shape)
    t = torch.rand(3) * 1000
    y = torch.randint(0, num_classes, (3,)) if num_classes else None
    out = net(x, t, y)
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))
    if num_classes:
        assert net(x, t, None).shape == x.shape
    perturb_output(net)
    out = net(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_gradients_reach_every_parameter_after_one_step(kind):
    torch.manual_seed(0)
    if kind == "unet":
        shape = (1, 8, 8)
        net = build_net(unet_cfg([1, 2], [8, 4], dropout=0.1), shape, 10)
    else:
        shape = (2,)
        net = build_net({"kind": "mlp", "width": 32, "depth": 3}, shape, 10)
    x = torch.randn(20, *shape)
    t = torch.rand(20) * 1000
    y = torch.arange(20) % 10
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for step in range(2):
        opt.zero_grad()
        loss = (net(x, t, y) - x).square().mean()
        loss.backward()
        if step == 0:
            opt.step()
    dead = [n for n, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"no gradient reached {dead}"


def test_unknown_key_and_bad_values_raise():
    with pytest.raises(ValueError, match="chanels"):
        build_net({"kind": "unet", "chanels": 32}, (1, 8, 8), 0)
    with pytest.raises(ValueError, match="wdith"):
        build_net({"kind": "mlp", "wdith": 32}, (2,), 0)
    with pytest.raises(ValueError, match="kind"):
        build_net({"kind": "transformer"}, (2,), 0)
    with pytest.raises(ValueError, match="attn_resolutions"):
        build_net(unet_cfg([1, 2], [16]), (1, 8, 8), 0)
    with pytest.raises(ValueError, match="embedding"):
        build_net(unet_cfg([1, 2], [], embedding="learned"), (1, 8, 8), 0)
    with pytest.raises(ValueError, match="data_shape"):
        build_net(unet_cfg([1, 2], []), (64,), 0)
    net = build_net(unet_cfg([1, 2], []), (1, 8, 8), 0)
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.randn(2, 1, 8, 8), torch.rand(2), torch.zeros(2, dtype=torch.long))


def test_parameter_count_grows_with_channels():
    counts = [sum(p.numel() for p in build_net(unet_cfg([1, 2], [4], channels=c), (1, 8, 8), 0).parameters())
              for c in (8, 16, 32)]
    assert counts[0] < counts[1] < counts[2]
    widths = [sum(p.numel() for p in build_net({"kind": "mlp", "width": w}, (2,), 0).parameters())
              for w in (32, 64)]
    assert widths[0] < widths[1]


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_conditioning_changes_output(kind):
    torch.manual_seed(0)
    shape = (1, 8, 8) if kind == "unet" else (2,)
    cfg = unet_cfg([1, 2], [4]) if kind == "unet" else {"kind": "mlp", "width": 32, "depth": 2}
    net = build_net(cfg, shape, 10).eval()
    perturb_output(net)
    x = torch.randn(4, *shape)
    t = torch.full((4,), 500.0)
    base = net(x, t, torch.zeros(4, dtype=torch.long))
    assert not torch.allclose(base, net(x, t, torch.ones(4, dtype=torch.long)))
    assert not torch.allclose(base, net(x, t, None))
    assert not torch.allclose(base, net(x, t * 0.5, torch.zeros(4, dtype=torch.long)))
    assert torch.allclose(base, net(x, torch.tensor(500.0), torch.zeros(4, dtype=torch.long)))


def test_unet_samples_are_independent_of_batch():
    torch.manual_seed(0)
    net = build_net(unet_cfg([1, 2, 2], [7]), (1, 28, 28), 10).eval()
    perturb_output(net)
    x, t, y = torch.randn(5, 1, 28, 28), torch.rand(5) * 1000, torch.randint(0, 10, (5,))
    torch.testing.assert_close(net(x, t, y)[:2], net(x[:2], t[:2], y[:2]), rtol=1e-4, atol=1e-5)


def test_fourier_frequencies_travel_with_state_dict():
    cfg = unet_cfg([1, 2], [], embedding="fourier")
    torch.manual_seed(0)
    a = build_net(cfg, (1, 8, 8), 0)
    torch.manual_seed(1)
    b = build_net(cfg, (1, 8, 8), 0)
    perturb_output(a)
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    assert not torch.allclose(a(x, t), b(x, t))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x, t), b(x, t), rtol=0, atol=0)


def test_positional_embedding_values():
    emb = PositionalEmbedding(8)(torch.tensor([0.0, 1.0]))
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])
    torch.testing.assert_close(emb[1], torch.cat([freqs.cos(), freqs.sin()]))


@pytest.mark.parametrize("shape", [(2,), (3, 4)])
def test_mlp_shapes(shape):
    torch.manual_seed(0)
    net = build_net({"kind": "mlp", "width": 16, "depth": 2, "embedding": "fourier"}, shape, 0)
    assert isinstance(net, MLP)
    x = torch.randn(5, *shape)
    out = net(x, torch.rand(5))
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(out))
