"""With deterministic algorithms on (run.deterministic), the training paths of lmm's nets and losses use no op without
a deterministic CUDA backward: lmm.nets.resize and the augmentations' translation equal the F.interpolate / indexing
they replace (which run otherwise, so default runs compute what they always did), and the graphs of the perceptual
and adversarial losses and of the U-Net hold none of the ops PyTorch names nondeterministic."""
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lmm.losses.adversarial import Adversarial, diff_augment, translate
from lmm.losses.perceptual import Perceptual
from lmm.nets import build_net
from lmm.nets.resize import bilinear_matrix, bilinear_resize, resize, upsample2x, upsample_nearest

# autograd node names of ops whose CUDA backward accumulates with atomicAdd (IndexBackward: index_put(accumulate))
NONDETERMINISTIC = ("Upsample", "GridSampler", "Gather", "IndexPut", "IndexBackward", "Scatter", "AdaptiveAvgPool",
                    "AdaptiveMaxPool", "ReflectionPad", "ReplicationPad", "EmbeddingBag", "MaxPool3D", "Cumsum",
                    "NllLoss2D", "CtcLoss")


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) without warn_only for one test, then the previous setting."""
    mode = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def graph_ops(*outputs: Tensor) -> set[str]:
    """Class names of every autograd node behind `outputs`."""
    seen, names = set(), set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack += [nxt for nxt, _ in node.next_functions if nxt is not None]
    return names


def nondeterministic(*outputs: Tensor) -> list[str]:
    return sorted(n for n in graph_ops(*outputs) if any(bad.lower() in n.lower() for bad in NONDETERMINISTIC))


def _default_mode_diff_augment(x: Tensor, policy: tuple[str, ...]) -> Tensor:
    """diff_augment with deterministic algorithms off: translation by advanced indexing (an index_put with
    accumulate in the backward)."""
    mode, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return diff_augment(x, policy)
    finally:
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def test_graph_ops_sees_the_replaced_ops():
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    assert nondeterministic(F.interpolate(x, size=(16, 16), mode="bilinear")) == ["UpsampleBilinear2DBackward0"]
    assert nondeterministic(F.interpolate(x, size=(16, 16), mode="nearest")) == ["UpsampleNearest2DBackward0"]
    assert nondeterministic(_default_mode_diff_augment(x, ("translation",))) == ["IndexBackward0"]


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (4, 4), (7, 7), (14, 14), (6, 10), (3, 5)])
def test_upsample2x_equals_nearest_interpolate(h, w):
    x = torch.randn(2, 3, h, w, requires_grad=True)
    for size in [(2 * h - 1, 2 * w - 1), (2 * h - 1, 2 * w), (2 * h, 2 * w - 1), (2 * h, 2 * w)]:
        y, ref = upsample2x(x, size), F.interpolate(x, size=size, mode="nearest")
        assert torch.equal(y, ref)
        g = torch.randn_like(ref)
        (grad,), (grad_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
        assert (grad - grad_ref).abs().max() <= 1e-6 * grad_ref.abs().max()
        assert not nondeterministic(y)
    with pytest.raises(ValueError, match="twice"):
        upsample2x(x, (2 * h + 1, 2 * w))


# (input size, output size, antialias): the pyramid enlarging 28 -> 64 (no antialias: only shrinking has it) and
# shrinking with antialias, the no-op, LPIPS's 28 -> 64, non-square, odd, and large inputs
RESIZES = [((28, 28), (64, 64), False), ((64, 64), (32, 32), True), ((32, 32), (32, 32), False),
           ((32, 32), (32, 32), True), ((28, 28), (64, 64), True), ((12, 20), (64, 64), False),
           ((7, 9), (64, 64), False), ((100, 50), (64, 64), True), ((299, 299), (64, 64), True),
           ((64, 64), (32, 32), False)]


@pytest.mark.parametrize("size_in,size_out,antialias", RESIZES)
def test_bilinear_resize_equals_interpolate(size_in, size_out, antialias):
    torch.manual_seed(0)
    x = (torch.rand(2, 3, *size_in) * 2 - 1).requires_grad_(True)
    y = bilinear_resize(x, size_out, antialias)
    ref = F.interpolate(x, size=size_out, mode="bilinear", align_corners=False, antialias=antialias)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert (y - ref).abs().max() <= 1e-6
    g = torch.randn_like(ref)
    (grad,), (grad_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
    assert (grad - grad_ref).abs().max() <= 1e-6 * grad_ref.abs().max()
    assert not nondeterministic(y)
    x64 = x.detach().double()
    torch.testing.assert_close(bilinear_resize(x64, size_out, antialias), F.interpolate(
        x64, size=size_out, mode="bilinear", align_corners=False, antialias=antialias), rtol=0, atol=1e-12)


def test_bilinear_matrix_is_cached_and_usable_after_inference_mode():
    bilinear_matrix.cache_clear()
    with torch.inference_mode():
        a = bilinear_matrix(28, 40, False, torch.float32, torch.device("cpu"))
    assert bilinear_matrix(28, 40, False, torch.float32, torch.device("cpu")) is a
    x = torch.rand(1, 1, 28, 28, requires_grad=True)
    bilinear_resize(x, (40, 40)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(a.sum(1), torch.ones(40))


def test_bilinear_resize_under_autocast_keeps_the_input_dtype():
    x = torch.rand(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bilinear_resize(x, (64, 64))
    assert y.dtype == torch.float32 and torch.equal(y, bilinear_resize(x, (64, 64)))


@pytest.mark.parametrize("shape", [(8, 1, 28, 28), (4, 3, 64, 64), (5, 3, 12, 20), (3, 1, 8, 8), (2, 1, 1, 1)])
@pytest.mark.parametrize("policy", [("translation",), ("color", "translation", "cutout")])
def test_diff_augment_equals_the_indexing_version(deterministic, shape, policy):
    for seed in range(3):
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(seed)).mul(2).sub(1).requires_grad_(True)
        torch.manual_seed(seed)
        y = diff_augment(x, policy)
        after = torch.rand(1)
        torch.manual_seed(seed)
        ref = _default_mode_diff_augment(x, policy)
        assert torch.equal(y, ref) and torch.equal(torch.rand(1), after)
        g = torch.randn_like(ref)
        (grad,), (grad_ref,) = torch.autograd.grad(y, x, g), torch.autograd.grad(ref, x, g)
        if policy == ("translation",):
            assert torch.equal(grad, grad_ref)
        else:
            assert (grad - grad_ref).abs().max() <= 1e-6 * grad_ref.abs().max()
        assert not nondeterministic(y)


def test_translate_is_exact_in_other_dtypes_and_under_autocast(deterministic):
    x = torch.randn(4, 3, 12, 20, dtype=torch.float64)
    dy, dx = torch.tensor([-1, 0, 1, 1]), torch.tensor([2, -2, 0, 1])
    ref = torch.zeros_like(x)
    for b in range(4):
        src = x[b, :, max(0, dy[b]):12 + min(0, dy[b]), max(0, dx[b]):20 + min(0, dx[b])]
        ref[b, :, max(0, -dy[b]):12 - max(0, dy[b]), max(0, -dx[b]):20 - max(0, dx[b])] = src
    assert torch.equal(translate(x, dy, dx), ref)
    assert torch.equal(translate(x.bfloat16(), dy, dx), ref.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = translate(x.float(), dy, dx)
    assert out.dtype == torch.float32 and torch.equal(out, ref.float())


def test_default_paths_are_the_torch_ops():
    """Without deterministic algorithms, resize / upsample / translation are F.interpolate and indexing, bitwise."""
    assert not torch.are_deterministic_algorithms_enabled()
    x = torch.rand(2, 1, 28, 28, requires_grad=True)
    assert torch.equal(resize(x, (64, 64)), F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False))
    assert torch.equal(resize(x, (16, 16), antialias=True),
                       F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True))
    assert torch.equal(upsample_nearest(x, (55, 56)), F.interpolate(x, size=(55, 56), mode="nearest"))
    assert "IndexBackward0" in graph_ops(diff_augment(x, ("translation",)))


class _Reals:
    def batch(self, step, rank, world, batch_size):
        return {"x": torch.rand(batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(step)) * 2 - 1}


def _backward(loss: Tensor, *inputs: Tensor) -> list[str]:
    """Run loss.sum()'s backward; the nondeterministic node names of its graph."""
    bad = nondeterministic(loss)
    loss.sum().backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0 for x in inputs)
    return bad


@pytest.mark.parametrize("resolution", [32, 64])
def test_perceptual_and_adversarial_backward_in_deterministic_mode(deterministic, resolution):
    target = torch.rand(2, 1, 28, 28) * 2 - 1
    perceptual = Perceptual(resolution=resolution)
    perceptual.setup((1, 28, 28), 0)
    pred = (torch.rand(2, 1, 28, 28) * 2 - 1).requires_grad_(True)
    assert _backward(perceptual(pred, target, {"step": 0}), pred) == []

    adv = Adversarial(resolution=resolution, width=8, r1=1.0)
    adv.setup((1, 28, 28), 0, reals=_Reals())
    pred = (torch.rand(2, 1, 28, 28) * 2 - 1).requires_grad_(True)
    assert _backward(adv(pred, target, {"step": 0, "y": None}), pred) == []
    disc_loss = adv.disc_loss(adv.disc, {}, 0, 0, 1)
    assert nondeterministic(disc_loss) == []
    disc_loss.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adv.disc.heads.parameters())


def test_lpips_backward_in_deterministic_mode(deterministic, tmp_path, monkeypatch):
    from lmm.nets import lpips

    torch.manual_seed(0)
    backbone = {f"features.{k}": v for k, v in lpips._features("alex").state_dict().items()}
    lin = tmp_path / "alex.pth"
    torch.save({f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(lpips.CHANNELS["alex"])}, lin)
    monkeypatch.setattr(lpips, "_load", lambda path, what: backbone)
    monkeypatch.setattr(lpips, "linear_weights_path", lambda net: lin)
    net = lpips.LPIPS("alex", resolution=64)
    a, b = (torch.rand(2, 1, 28, 28) * 2 - 1 for _ in range(2))
    b.requires_grad_(True)
    assert _backward(net(a, b), b) == []


@pytest.mark.parametrize("shape,mult,attn", [((1, 7, 7), [1, 2, 2], [4, 2]), ((3, 12, 20), [1, 2], [6]),
                                             ((1, 28, 28), [1, 2, 2], [7])])
def test_unet_backward_in_deterministic_mode(deterministic, shape, mult, attn):
    torch.manual_seed(0)
    net = build_net(dict(kind="unet", channels=8, channel_mult=mult, num_blocks=1, attn_resolutions=attn), shape, 0)
    with torch.no_grad():
        net.conv_out.weight.normal_(std=0.1)
    x = torch.randn(2, *shape, requires_grad=True)
    out = net(x, torch.rand(2) * 1000)
    assert out.shape == x.shape
    assert _backward(out.square().mean((1, 2, 3)), x) == []
    assert all(p.grad is not None for p in net.parameters())
