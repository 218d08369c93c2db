"""Several layers in one pass: the layer chain's activations and gradients against plain autograd
and the per-layer captures, and every CAM method's multi-layer maps against its per-layer maps.

Tolerances: the chain runs the same operations as a per-layer split, but the gradient of a value
read by several later operations is summed piece by piece instead of in one backward, so sums
may associate differently: float32 rounding, far below ``GRAD_RTOL = 1e-5`` of the largest
gradient. Activations come from the same operations in the same order (``ACT_RTOL = 1e-6``).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import fastxai
from fastxai.capture import capture_layer, capture_layers, get_chain, split_layer_ref
from fastxai.methods._base import fuse_layer_maps

GRAD_RTOL = 1e-5  # of the largest |gradient| of the layer
ACT_RTOL = 1e-6  # of the largest |activation| of the layer


def autograd_reference(
    model: nn.Module, x: Tensor, layers: list[str], classes: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Every layer's activation and ``d(sum_n y_n[c_n]) / dA`` by plain autograd in one pass:
    a forward hook adds a zero tensor that requires grad to the layer's output (at its call
    index), and one ``torch.autograd.grad`` differentiates the score w.r.t. all of them."""
    wanted = [split_layer_ref(layer) for layer in layers]
    calls: dict[str, int] = {}
    taps: dict[tuple[str, int], Tensor] = {}
    acts: dict[tuple[str, int], Tensor] = {}

    def hook(name: str):
        def add_tap(_m: nn.Module, _i: object, out: Tensor) -> Tensor | None:
            index = calls.get(name, 0)
            calls[name] = index + 1
            if (name, index) not in wanted:
                return None
            acts[name, index] = out.detach().clone()
            taps[name, index] = torch.zeros_like(out, requires_grad=True)
            return out + taps[name, index]

        return add_tap

    handles = [
        model.get_submodule(name).register_forward_hook(hook(name))
        for name in {name for name, _ in wanted}
    ]
    try:
        with torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, classes[:, None]).sum()
            grads = torch.autograd.grad(score, [taps[ref] for ref in wanted])
    finally:
        for handle in handles:
            handle.remove()
    return [acts[ref] for ref in wanted], list(grads)


def assert_close_to(got: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zero, the comparison has no power"
    torch.testing.assert_close(got, expected, rtol=0, atol=rtol * scale, msg=what)


# Layers out of graph order; a block and its last sub-block (ancestor and descendant); a module
# called twice; a layer inside a block whose suffix reads the block input; a layer followed by an
# in-place ReLU (densenet121's norm5).
CHAIN_CASES = [
    ("resnet18", ["layer4", "layer1.0.relu@1", "layer4.1", "layer2.0.bn2", "layer3"]),
    (
        "densenet121",
        [
            "features.denseblock2.denselayer3",
            "features.norm5",
            "features.denseblock2",
            "features.transition2.conv",
        ],
    ),
]


@pytest.mark.parametrize(("model_name", "layers"), CHAIN_CASES)
def test_chain_equals_autograd_and_per_layer_captures(tv_model, images, model_name, layers):
    model = tv_model(model_name)
    x = images(2, 64)
    classes = torch.tensor([3, 917])
    assert get_chain(model, layers) is not None  # the one-pass path is the one tested
    chain = capture_layers(model, x, layers, classes, with_gradient=True)
    acts, grads = autograd_reference(model, x, layers, classes)
    for layer, cap, act, grad in zip(layers, chain, acts, grads, strict=True):
        single = capture_layer(model, x, layer, classes, with_gradient=True)
        assert_close_to(cap.activation, act, ACT_RTOL, f"{layer} activation vs autograd")
        assert_close_to(cap.gradient, grad, GRAD_RTOL, f"{layer} gradient vs autograd")
        assert_close_to(cap.activation, single.activation, ACT_RTOL, f"{layer} activation")
        assert_close_to(cap.gradient, single.gradient, GRAD_RTOL, f"{layer} gradient")
        torch.testing.assert_close(cap.logits, single.logits, rtol=1e-6, atol=1e-6)
    if model_name == "densenet121":
        # F.relu(norm5, inplace=True) follows: the activation must be read before it.
        assert chain[layers.index("features.norm5")].activation.min() < 0
    no_grad = capture_layers(model, x, layers, classes, with_gradient=False)
    for cap, act in zip(no_grad, acts, strict=True):
        assert cap.gradient is None
        assert_close_to(cap.activation, act, ACT_RTOL, "activation without gradient")


class Branches(nn.Module):
    """Two parallel branches (neither layer is downstream of the other), a residual add, a
    module called twice and a size read early and used late: the cases a single cut cannot
    serve."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.left = nn.Conv2d(6, 6, 3, padding=1)
        self.right = nn.Sequential(nn.Conv2d(6, 6, 1), nn.Tanh())
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        n = x.size(0)  # a Python int that crosses every cut
        h = torch.relu(self.stem(x))
        a = self.shared(self.left(h))
        b = self.right(h) * h
        c = self.shared(a + b) + h
        return self.head(c.mean((2, 3))).view(n, -1)


@pytest.mark.parametrize(
    "layers",
    [
        ["right", "shared@1", "left", "shared@0", "right.0", "stem"],
        ["right.0", "left", "shared@1"],  # the shallowest layer (left) does not feed right.0
    ],
)
def test_parallel_branches_residuals_and_repeated_calls(layers):
    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 2, 3])
    assert get_chain(model, layers) is not None
    caps = capture_layers(model, x, layers, classes, with_gradient=True)
    acts, grads = autograd_reference(model, x, layers, classes)
    for layer, cap, act, grad in zip(layers, caps, acts, grads, strict=True):
        assert_close_to(cap.activation, act, ACT_RTOL, f"{layer} activation")
        assert_close_to(cap.gradient, grad, GRAD_RTOL, f"{layer} gradient")


def test_compiled_chain_carries_python_values_between_pieces():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Branches().eval()
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    layers = ["right.0", "left", "shared@1"]
    eager = fastxai.gradcam(model, x, layers, [0, 2, 3])
    compiled = torch.compile(
        lambda images: fastxai.gradcam(model, images, layers, [0, 2, 3]),
        fullgraph=True,
        backend="eager",
    )
    got = compiled(x)
    for raw, expected in zip(
        got.extras["raw_per_layer"], eager.extras["raw_per_layer"], strict=True
    ):
        assert_close_to(raw, expected, GRAD_RTOL, "compiled raw map")


def test_reshape_transform_applies_to_every_layer():
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.block1 = nn.Linear(8, 8)
            self.block2 = nn.Linear(8, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, x: Tensor) -> Tensor:
            t = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
            t = t + torch.relu(self.block1(t))
            return self.head(torch.relu(self.block2(t)).mean(1))

    def to_map(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(t.shape[0], 8, 4, 4)

    torch.manual_seed(0)
    model = Tokens().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    classes = torch.tensor([1, 4])
    layers = ["block1", "block2"]
    caps = capture_layers(model, x, layers, classes, with_gradient=True, reshape_transform=to_map)
    acts, grads = autograd_reference(model, x, layers, classes)
    for layer, cap, act, grad in zip(layers, caps, acts, grads, strict=True):
        assert_close_to(cap.activation, to_map(act), ACT_RTOL, f"{layer} activation")
        assert_close_to(cap.gradient, to_map(grad), GRAD_RTOL, f"{layer} gradient")
        assert cap.raw_activation.shape == act.shape


GRADIENT_AND_EIGEN = ["gradcam", "layercam", "gradcampp", "xgradcam", "hirescam", "eigencam"]


@pytest.mark.parametrize("method", GRADIENT_AND_EIGEN)
@pytest.mark.parametrize(
    ("model_name", "layers"),
    [
        ("resnet18", ["layer2", "layer3", "layer4.1"]),
        ("densenet121", ["features.denseblock2", "features.transition2.conv"]),
    ],
)
def test_methods_over_several_layers_equal_their_per_layer_maps(
    tv_model, images, method, model_name, layers
):
    model = tv_model(model_name)
    x = images(2, 64)
    explain = fastxai.METHODS[method]
    for fusion in ("mean", "tanh"):
        several = explain(model, x, layers, fusion=fusion)
        singles = [explain(model, x, layer) for layer in layers]
        for layer, raw, single in zip(
            layers, several.extras["raw_per_layer"], singles, strict=True
        ):
            # raw maps are sums over channels of activation x gradient terms: GRAD_RTOL of the
            # largest raw value bounds the float32 difference of the gradients
            assert_close_to(raw, single.raw, GRAD_RTOL, f"{method} {layer} raw map")
        expected = fuse_layer_maps([s.raw for s in singles], (64, 64), fusion)
        torch.testing.assert_close(several.maps, expected, rtol=0, atol=1e-5)


class SmallNet(nn.Module):
    """Few channels, so Score-CAM and Ablation-CAM (one forward per channel) stay fast."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        return self.head(self.features(h).mean((2, 3)))


def small_net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", *GRADIENT_AND_EIGEN])
def test_every_method_over_several_layers_of_a_small_net(method):
    model = small_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    layers = ["features", "stem", "block"]
    explain = fastxai.METHODS[method]
    several = explain(model, x, layers, [1, 3])
    singles = [explain(model, x, layer, [1, 3]) for layer in layers]
    for layer, raw, single in zip(layers, several.extras["raw_per_layer"], singles, strict=True):
        assert_close_to(raw, single.raw, GRAD_RTOL, f"{method} {layer} raw map")
    expected = fuse_layer_maps([s.raw for s in singles], (16, 16), "mean")
    torch.testing.assert_close(several.maps, expected, rtol=0, atol=1e-5)


def test_train_mode_batchnorm_several_layers_update_nothing():
    model = small_net().train()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    before = {name: b.clone() for name, b in model.named_buffers()}
    layers = ["stem", "block", "features"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-mode notice
        several = fastxai.gradcam(model, x, layers, [0, 1, 2, 3])
        singles = [fastxai.gradcam(model, x, layer, [0, 1, 2, 3]) for layer in layers]
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    assert model.training
    for raw, single in zip(several.extras["raw_per_layer"], singles, strict=True):
        assert_close_to(raw, single.raw, GRAD_RTOL, "train-mode raw map")
    # batch statistics were used: eval mode gives another map
    eval_raw = fastxai.gradcam(small_net(), x, layers, [0, 1, 2, 3]).extras["raw_per_layer"][0]
    assert (eval_raw - several.extras["raw_per_layer"][0]).abs().max() > 1e-3


def test_compiled_fullgraph_uses_the_prepared_chain(monkeypatch):
    torch._dynamo.reset()
    model = small_net()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    layers = ["stem", "block", "features"]
    expected = [fastxai.layercam(model, x, layer, [2, 4]).raw for layer in layers]
    fresh = small_net()  # no eager call has split this one
    fastxai.capture.prepare(fresh, layers)

    def per_layer(*args, **kwargs):
        raise AssertionError("the layers were captured one by one")

    monkeypatch.setattr(fastxai.capture, "capture_layer", per_layer)
    compiled = torch.compile(
        lambda images: fastxai.layercam(fresh, images, layers, [2, 4]),
        fullgraph=True,
        backend="eager",
    )
    got = compiled(x)
    for raw, single in zip(got.extras["raw_per_layer"], expected, strict=True):
        assert_close_to(raw, single, GRAD_RTOL, "compiled raw map")


def test_autocast_several_layers_equal_per_layer(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    layers = ["layer2", "layer3", "layer4"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caps = capture_layers(model, x, layers, [5, 6], with_gradient=True)
        singles = [capture_layer(model, x, layer, [5, 6], with_gradient=True) for layer in layers]
    for cap, single in zip(caps, singles, strict=True):
        assert cap.activation.dtype == single.activation.dtype == torch.bfloat16
        # the same bfloat16 operations; sums may associate differently: 2^-8 of the largest
        assert_close_to(cap.activation.float(), single.activation.float(), 2**-8, "activation")
        assert_close_to(cap.gradient.float(), single.gradient.float(), 2**-8, "gradient")
    maps = fastxai.layercam(model, x, layers).maps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = fastxai.layercam(model, x, layers).maps
    assert reduced.dtype == torch.float32
    assert (reduced - maps).abs().mean() < 0.05  # bfloat16 keeps the maps' shape


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = torch.relu(self.conv1(x))
        if a.mean() > -1:  # always true, but data-dependent: torch.fx cannot trace it
            a = a * 2
        return self.head(torch.relu(self.conv2(a)).mean((2, 3)))


def test_untraceable_models_fall_back_to_hooks_per_layer():
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    layers = ["conv2", "conv1"]
    assert get_chain(model, layers) is None
    with pytest.warns(UserWarning, match="could not trace"):
        caps = capture_layers(model, x, layers, [0, 2], with_gradient=True)
    acts, grads = autograd_reference(model, x, layers, torch.tensor([0, 2]))
    for layer, cap, act, grad in zip(layers, caps, acts, grads, strict=True):
        assert cap.split is None
        assert_close_to(cap.activation, act, ACT_RTOL, f"{layer} activation")
        assert_close_to(cap.gradient, grad, GRAD_RTOL, f"{layer} gradient")
    assert all(not m._forward_hooks for m in model.modules())


def test_layers_one_trace_cannot_reach_are_reported_by_the_per_layer_path(tv_model, images):
    model = tv_model("resnet18")
    with pytest.raises(ValueError, match="called 2 time"):
        fastxai.gradcam(model, images(1, 32), ["layer3", "layer1.0.relu@2"])
