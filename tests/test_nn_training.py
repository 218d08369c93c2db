"""fastxai.nn.Explainer in a training loop: logits with their graph, differentiable maps
(``create_graph=True``) checked against a hand-written double backward, under torch.compile, a few
optimizer steps, BatchNorm updated once, and the default path unchanged."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastxai
from fastxai.nn import Explainer

EPS = 1e-7  # pytorch-grad-cam's min-max epsilon


class ResidualCNN(nn.Module):
    """A small CNN whose explained layer ``block`` is followed by a residual add (the network
    after the layer reads ``h`` from before it) and a BatchNorm."""

    def __init__(self, classes: int = 3, untraceable: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.block = nn.Conv2d(6, 6, 3, padding=1)
        self.head_conv = nn.Conv2d(6, 6, 3, padding=1, stride=2)
        self.head_bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, classes)
        self.untraceable = untraceable

    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, h)``: the layer's output and the residual input the rest of the network reads."""
        h = F.relu(self.bn(self.stem(x)))
        if self.untraceable and x.sum() > float("-inf"):  # a branch on a value: torch.fx fails
            h = h * 1.0
        return self.block(h), h

    def head(self, a: Tensor, h: Tensor) -> Tensor:
        z = F.relu(self.head_bn(self.head_conv(F.relu(a) + h)))
        return self.fc(z.mean((2, 3)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(*self.features(x))


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> ResidualCNN:
    torch.manual_seed(seed)
    model = ResidualCNN(**kwargs).to(dtype)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()


def images(n: int = 4, size: int = 12, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=dtype)


def minmax(z: Tensor) -> Tensor:
    flat = z.flatten(1)
    shifted = flat - flat.min(1, keepdim=True).values
    return (shifted / (shifted.max(1, keepdim=True).values + EPS)).view_as(z)


def hand_raw_map(method: str, model: ResidualCNN, a: Tensor, g: Tensor, y: Tensor) -> Tensor:
    """Each method's raw map written out from its paper's formula (pytorch-grad-cam's eps)."""
    if method == "gradcam":
        return (g.mean((2, 3), keepdim=True) * a).sum(1)
    if method == "hirescam":
        return (g * a).sum(1)
    if method == "layercam":
        return F.relu((F.relu(g) * a).sum(1))
    if method == "xgradcam":
        w = (g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3))
        return (w[:, :, None, None] * a).sum(1)
    if method == "gradcampp":
        g2, g3 = g**2, g**3
        alpha = g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        w = (F.relu(g) * alpha).sum((2, 3))
        return (w[:, :, None, None] * a).sum(1)
    if method == "cam":
        return (model.fc.weight[y][:, :, None, None] * a).sum(1)
    raise AssertionError(method)


def hand_maps(raw: Tensor, size: tuple[int, int]) -> Tensor:
    """ReLU, min-max, bilinear upsampling (align_corners=False), min-max."""
    low = minmax(F.relu(raw))
    return minmax(F.interpolate(low[:, None], size=size, mode="bilinear")[:, 0])


def guided_loss(logits: Tensor, maps: Tensor, raw: Tensor, y: Tensor, outside: Tensor) -> Tensor:
    """Cross-entropy plus an explanation-guided term: saliency outside the allowed region."""
    return F.cross_entropy(logits, y) + 0.5 * (maps * outside).mean() + 0.1 * raw.square().mean()


def hand_step(model: ResidualCNN, method: str, x: Tensor, y: Tensor, outside: Tensor) -> Tensor:
    """The reference training step: plain autograd on the model's own two halves, the map's
    gradient taken with torch.autograd.grad(create_graph=True), then the loss."""
    a, h = model.features(x)
    logits = model.head(a, h)
    score = logits.gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    raw = hand_raw_map(method, model, a, g, y)
    return guided_loss(logits, hand_maps(raw, x.shape[2:]), raw, y, outside)


def outside_region(x: Tensor) -> Tensor:
    outside = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=x.dtype)
    outside[:, 3:9, 3:9] = 0
    return outside


def parameter_grads(model: nn.Module) -> list[Tensor]:
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def buffers(model: nn.Module) -> list[Tensor]:
    return [b.clone() for b in model.buffers()]


@pytest.mark.parametrize(
    "method", ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "cam"]
)
def test_guided_loss_gradients_equal_hand_written_double_backward(method: str) -> None:
    model = make_model()
    reference = copy.deepcopy(model)
    x, y = images(), torch.tensor([0, 1, 2, 1])
    outside = outside_region(x)
    explainer = Explainer(model, "block", method=method, create_graph=True)

    logits, explanation = explainer(x, y)
    assert all(p.grad is None for p in model.parameters())  # the explainer writes no .grad
    loss = guided_loss(logits, explanation.maps, explanation.raw, y, outside)
    loss.backward()
    expected_loss = hand_step(reference, method, x, y, outside)
    expected_loss.backward()

    # float64 on both sides: the two routes differ by rounding only (~1e-13)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(parameter_grads(model), parameter_grads(reference), strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(buffers(model), buffers(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # BatchNorm updated once


def test_two_fused_layers_are_differentiable_too() -> None:
    """Several layers: fastxai.ops.fuse_maps (its kernels have no backward) must take the
    differentiable reference; pytorch-grad-cam's mean fusion written out."""
    model = make_model()
    reference = copy.deepcopy(model)
    x, y = images(), torch.tensor([1, 1, 0, 2])
    explainer = Explainer(model, ["block", "head_conv"], method="layercam", create_graph=True)
    logits, explanation = explainer(x, y)
    (F.cross_entropy(logits, y) + explanation.maps.square().mean()).backward()

    a, h = reference.features(x)
    z = reference.head_conv(F.relu(a) + h)
    expected = reference.fc(F.relu(reference.head_bn(z)).mean((2, 3)))
    score = expected.gather(1, y[:, None]).sum()
    grads = torch.autograd.grad(score, [a, z], create_graph=True)
    upsampled = [
        F.interpolate(
            minmax(hand_raw_map("layercam", reference, t, g, y))[:, None],
            x.shape[2:],
            mode="bilinear",
        )
        for t, g in zip([a, z], grads, strict=True)
    ]
    maps = minmax(torch.cat(upsampled, 1).mean(1))
    torch.testing.assert_close(explanation.maps, maps, rtol=1e-7, atol=1e-9)
    (F.cross_entropy(expected, y) + maps.square().mean()).backward()
    for got, want in zip(parameter_grads(model), parameter_grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(buffers(model), buffers(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_untraceable_model_takes_the_hook_path_with_the_same_gradients() -> None:
    model = make_model(untraceable=True)
    reference = copy.deepcopy(model)
    x, y = images(), torch.tensor([2, 0, 1, 1])
    outside = outside_region(x)
    with pytest.warns(UserWarning, match="torch.fx could not trace"):
        explainer = Explainer(model, "block", create_graph=True)
    logits, explanation = explainer(x, y)
    guided_loss(logits, explanation.maps, explanation.raw, y, outside).backward()
    hand_step(reference, "gradcam", x, y, outside).backward()
    for got, want in zip(parameter_grads(model), parameter_grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(buffers(model), buffers(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert not model._forward_hooks and not model.block._forward_hooks


def test_softmax_target_keeps_its_second_derivative() -> None:
    """A callable target that is not linear in the logits: its cotangent depends on them."""
    model = make_model().eval()
    reference = copy.deepcopy(model)
    x = images()

    def probability(out: Tensor) -> Tensor:
        return torch.softmax(out, -1)[1]

    _, explanation = Explainer(model, "block", create_graph=True)(x, probability)
    explanation.maps.square().mean().backward()
    a, h = reference.features(x)
    score = torch.softmax(reference.head(a, h), 1)[:, 1].sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    hand_maps(
        hand_raw_map("gradcam", reference, a, g, None), x.shape[2:]
    ).square().mean().backward()
    for got, want in zip(parameter_grads(model), parameter_grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_training_step_matches_eager() -> None:
    torch._dynamo.reset()
    model = make_model(dtype=torch.float32)
    twin = copy.deepcopy(model)
    x, y = images(dtype=torch.float32), torch.tensor([0, 1, 2, 1])
    outside = outside_region(x)

    def step(explainer: nn.Module) -> Tensor:
        logits, explanation = explainer(x, y)
        loss = guided_loss(logits, explanation.maps, explanation.raw, y, outside)
        loss.backward()
        return loss.detach()

    eager_loss = step(Explainer(model, "block", method="gradcam", create_graph=True))
    # One graph without breaks, through AOTAutograd (which also traces the double backward).
    # Inductor compiles the same graph in minutes on two CPU threads, too long for a unit test.
    compiled = torch.compile(
        Explainer(twin, "block", method="gradcam", create_graph=True),
        fullgraph=True,
        backend="aot_eager",
    )
    compiled_loss = step(compiled)
    # float32; the traced graph may fuse or reorder ops: a few ulps, amplified by the min-max
    # divisions of the map term's backward
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(parameter_grads(twin), parameter_grads(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for got, want in zip(buffers(twin), buffers(model), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # BatchNorm updated once


def toy_task(n: int) -> tuple[Tensor, Tensor, Tensor]:
    """A bright square on the left (class 0) or the right (class 1) of noise; ``outside`` marks
    the pixels away from the square."""
    g = torch.Generator().manual_seed(3)
    x = 0.3 * torch.randn(n, 3, 12, 12, generator=g)
    y = torch.arange(n) % 2
    outside = torch.ones(n, 12, 12)
    for i in range(n):
        col = 1 if y[i] == 0 else 7
        x[i, :, 4:8, col : col + 4] += 2.0
        outside[i, 4:8, col : col + 4] = 0
    return x, y, outside


def test_a_few_optimizer_steps_reduce_the_guided_loss() -> None:
    torch.manual_seed(0)
    model = ResidualCNN(classes=2).train()
    x, y, outside = toy_task(8)
    explainer = Explainer(model, "block", method="gradcam", create_graph=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    losses, map_terms = [], []
    for _ in range(15):
        optimizer.zero_grad()
        logits, explanation = explainer(x, y)
        map_term = (explanation.maps * outside).mean()
        loss = F.cross_entropy(logits, y) + map_term
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        map_terms.append(map_term.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert map_terms[-1] < map_terms[0], map_terms


def test_default_path_records_nothing_and_updates_no_buffer() -> None:
    model = make_model()
    x = images()
    before = buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = fastxai.gradcam(model, x, "block", [0, 1, 2, 1])
    assert not explanation.maps.requires_grad and not explanation.raw.requires_grad
    assert not explanation.logits.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(b, c) for b, c in zip(buffers(model), before, strict=True))

    # the Explainer without create_graph: the logits carry the graph, the maps do not
    reference = copy.deepcopy(model)
    logits, explanation = Explainer(model, "block")(x)
    assert logits.requires_grad and not explanation.maps.requires_grad
    assert not explanation.raw.requires_grad
    F.cross_entropy(logits, logits.argmax(1)).backward()
    expected = reference(x)
    F.cross_entropy(expected, expected.argmax(1)).backward()
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(parameter_grads(model), parameter_grads(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(buffers(model), buffers(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)  # one forward's update

    # under no_grad: an evaluation pass, no graph and no buffer updated
    after_step = buffers(model)
    with torch.no_grad():
        logits, explanation = Explainer(model, "block", create_graph=True)(x)
    assert not logits.requires_grad and not explanation.maps.requires_grad
    assert all(torch.equal(b, c) for b, c in zip(buffers(model), after_step, strict=True))


def test_training_step_updates_batchnorm_once_whatever_else_runs() -> None:
    """Several layers and TFT run more forwards; only the first is the step's forward."""
    model = make_model()
    reference = copy.deepcopy(model)
    x = images()
    explainer = Explainer(model, ["block", "head_conv"], method="layercam", tft=True)
    logits, _ = explainer(x)
    reference(x)
    assert logits.requires_grad
    for got, want in zip(buffers(model), buffers(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_step_that_raises_gives_the_buffers_back() -> None:
    model = make_model()
    before = buffers(model)
    with pytest.raises(ValueError, match="targets"):
        Explainer(model, "block", create_graph=True)(images(), [0, 1, 2, 99])  # after a forward
    assert all(torch.equal(b, c) for b, c in zip(buffers(model), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_a_step_forward_leaves_grads_hooks_flags_and_input_alone() -> None:
    model = make_model().eval()
    params = list(model.parameters())
    params[-1].grad = torch.full_like(params[-1], 0.5)
    params[0].requires_grad_(False)
    model.stem.register_forward_hook(lambda m, i, o: None)
    hooks = [dict(m._forward_hooks) for m in model.modules()]
    x = images().requires_grad_(True)
    x_before, x_version, before = x.detach().clone(), x._version, buffers(model)
    logits, explanation = Explainer(model, "block", create_graph=True)(x, [0, 1, 2, 1])
    assert logits.requires_grad and explanation.maps.requires_grad
    assert [p.grad is None for p in params] == [True] * (len(params) - 1) + [False]
    assert params[0].grad is None and torch.equal(params[-1].grad, torch.full_like(params[-1], 0.5))
    assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    assert [dict(m._forward_hooks) for m in model.modules()] == hooks
    assert x.grad is None and x._version == x_version and torch.equal(x.detach(), x_before)
    assert all(torch.equal(b, c) for b, c in zip(buffers(model), before, strict=True))
    assert not model.training


@pytest.mark.parametrize("method", ["scorecam", "ablationcam", "eigencam"])
def test_create_graph_on_a_method_without_differentiable_maps_is_refused(method: str) -> None:
    model = make_model().eval()
    with pytest.raises(ValueError, match=f"create_graph=True: {method}'s maps are not"):
        Explainer(model, "block", method=method, create_graph=True)
    with pytest.raises(ValueError, match=f"create_graph=True: {method}'s maps are not"):
        fastxai.METHODS[method](model, images(), "block", create_graph=True)
    with pytest.raises(ValueError, match="create_graph=True: tft=True is not differentiable"):
        Explainer(model, "block", tft=True, create_graph=True)(images())
