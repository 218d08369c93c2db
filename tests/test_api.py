"""The functional API: targets, batching, layers, the model left untouched, the hook fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastxai
from fastxai.capture import LayerSplit

GRADIENT_METHODS = ["gradcam", "gradcampp", "xgradcam", "layercam", "hirescam"]


def model_state(model: nn.Module) -> tuple:
    return (
        model.training,
        [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
        [dict(m._forward_hooks) for m in model.modules()],
        [dict(m._forward_pre_hooks) for m in model.modules()],
        [dict(m._backward_hooks) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_same_state(before: tuple, after: tuple) -> None:
    assert before[:5] == after[:5]
    assert all(torch.equal(before[5][k], after[5][k]) for k in before[5])


@pytest.mark.parametrize("method", [*GRADIENT_METHODS, "cam", "eigencam", "ablationcam"])
def test_batched_equals_one_by_one_and_per_image_targets(tv_model, images, method):
    model = tv_model("resnet18")
    x = images(3, 64)
    targets = [4, 500, 999]
    batched = fastxai.METHODS[method](model, x, "layer4", targets)
    for n in range(3):
        single = fastxai.METHODS[method](model, x[n : n + 1], "layer4", targets[n])
        # Ablation-CAM's y - y_k cancels: batch-size-dependent GEMM rounding shows at ~1e-4.
        tolerance = 5e-4 if method == "ablationcam" else 2e-6
        assert torch.allclose(batched.maps[n], single.maps[0], atol=tolerance)
    assert batched.targets.tolist() == targets
    assert torch.allclose(batched.logits, model(x), atol=1e-5)
    assert batched.maps.amin() >= 0 and batched.maps.amax() <= 1


def test_default_target_is_top1_and_int_broadcasts(tv_model, images):
    model = tv_model("resnet18")
    x = images(3, 64)
    top1 = model(x).argmax(1)
    assert torch.equal(fastxai.gradcam(model, x, "layer3").targets, top1)
    broadcast = fastxai.gradcam(model, x, "layer3", 7)
    explicit = fastxai.gradcam(model, x, "layer3", [7, 7, 7])
    assert torch.equal(broadcast.maps, explicit.maps)


def test_callable_targets_equal_class_targets(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    by_index = fastxai.gradcam(model, x, "layer3", [10, 20])
    by_callable = fastxai.gradcam(model, x, "layer3", [lambda o: o[10], lambda o: o[20]])
    assert torch.allclose(by_index.maps, by_callable.maps, atol=1e-6)
    assert by_callable.targets.tolist() == [-1, -1]
    # a callable that mixes classes differs from either class alone
    mixed = fastxai.gradcam(model, x, "layer3", lambda o: o[10] - o[20])
    assert (mixed.maps - by_index.maps).abs().max() > 1e-3


def test_gradient_equals_autograd_reference(tv_model, images):
    """g = d(sum_n y_{n,c_n}) / dA from the split equals plain autograd with a cloned output."""
    model = tv_model("resnet50")
    x = images(2, 64)
    for layer_name in ("layer2.3", "layer3.1.bn2", "layer4"):
        layer = model.get_submodule(layer_name)
        kept = {}

        def keep(_m, _i, out, kept=kept):
            kept["a"] = out.detach().requires_grad_(True)
            return kept["a"].clone()

        handle = layer.register_forward_hook(keep)
        try:
            logits = model(x)
        finally:
            handle.remove()
        (g,) = torch.autograd.grad(logits[:, 3].sum(), kept["a"])
        contributions = fastxai.hirescam(model, x, layer_name, 3).raw
        expected = (g * kept["a"]).sum(1)
        assert torch.allclose(contributions, expected, atol=1e-6, rtol=1e-4), layer_name


def test_model_is_not_mutated(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    x_before = x.clone()
    before = model_state(model)
    for name, method in fastxai.METHODS.items():
        layer = "layer4" if name in ("scorecam", "cam") else "layer3"
        if name == "scorecam":
            method(model, x[:, :, :32, :32], layer)
        else:
            method(model, x, layer)
    assert_same_state(before, model_state(model))
    assert torch.equal(x, x_before) and not x.requires_grad


def test_model_not_mutated_after_exception(tv_model, images):
    model = tv_model("resnet18")
    before = model_state(model)

    def failing_target(_output):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fastxai.gradcam(model, images(2, 64), "layer3", failing_target)
    assert_same_state(before, model_state(model))


def test_works_under_no_grad_and_inference_of_frozen_model(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    expected = fastxai.gradcam(model, x, "layer3").maps
    with torch.no_grad():
        under_no_grad = fastxai.gradcam(model, x, "layer3").maps
    assert torch.equal(expected, under_no_grad)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        frozen = fastxai.gradcam(model, x, "layer3").maps
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    assert torch.equal(expected, frozen)


def test_layer_as_module_or_name_and_training_mode_warning(tv_model, images):
    model = tv_model("resnet18")
    x = images(2, 64)
    by_module = fastxai.layercam(model, x, model.layer3[1].conv2)
    by_name = fastxai.layercam(model, x, "layer3.1.conv2")
    assert torch.equal(by_module.maps, by_name.maps)


def test_split_is_cached_and_rebuilt_when_structure_changes(images):
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()
    x = images(2, 16)
    fastxai.gradcam(model, x, "0")
    split = fastxai.capture.get_split(model, "0")
    assert fastxai.capture.get_split(model, "0") is split
    model[4] = nn.Linear(4, 7)
    assert fastxai.capture.get_split(model, "0") is not split
    assert fastxai.gradcam(model, x, "0").logits.shape == (2, 7)


def test_residual_carry_and_in_place_ops_are_handled(tv_model, images):
    model = tv_model("resnet18")
    split = LayerSplit(model, "layer2.0.bn2")  # suffix needs the block's identity input
    assert split.num_carried == 1
    x = images(2, 64)
    a, *carry = split.prefix(x)
    a_copy = a.clone()
    assert torch.allclose(split.suffix(a, *carry), model(x), atol=1e-5)
    assert torch.equal(a, a_copy)  # the in-place add and ReLU did not touch the caller's tensor


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the hook fallback runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        if a.mean() > -1:  # always true, but data-dependent
            a = a * 2
        return self.head(a.mean((2, 3)))


def test_hook_fallback_for_untraceable_models(images):
    torch.manual_seed(0)
    model = Untraceable().eval()
    x = images(2, 16)
    with pytest.warns(UserWarning, match="could not trace"):
        explanation = fastxai.gradcam(model, x, "conv", [0, 1])
    conv_out = model.conv(x).detach().requires_grad_(True)
    logits = model.head((torch.relu(conv_out) * 2).mean((2, 3)))
    (g,) = torch.autograd.grad(logits[0, 0] + logits[1, 1], conv_out)
    raw = (g.mean((2, 3))[:, :, None, None] * conv_out).sum(1)
    assert torch.allclose(explanation.raw, raw.detach(), atol=1e-6)
    assert all(not m._forward_hooks for m in model.modules())


def test_module_called_twice_selects_call_with_at(images):
    relu = nn.ReLU()
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        relu,
        nn.Conv2d(4, 4, 3),
        relu,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()
    x = images(1, 16)
    first = fastxai.gradcam(model, x, "1")
    second = fastxai.gradcam(model, x, "1@1")
    assert first.raw.shape[-1] == 14 and second.raw.shape[-1] == 12
    with pytest.raises(ValueError, match="called 2 time"):
        fastxai.gradcam(model, x, "1@2")


def test_scorecam_evaluates_zero_masks_once(images, monkeypatch):
    """Dead channels give the all-zero image; its score must equal running it per channel."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).eval()
    with torch.no_grad():
        model[0].bias[:4] = -100.0  # channels 0-3 are dead after the ReLU
    x = images(2, 16)
    calls = []
    original_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda t: calls.append(t.shape[0]) or original_forward(t))
    explanation = fastxai.scorecam(model, x, "1", batch_size=100)
    assert sorted(calls) == [1, 8]  # one zero image for all dead channels, 2 x 4 live channels
    monkeypatch.undo()
    a = torch.relu(model[0](x))
    naive = torch.empty(2, 8)
    for n in range(2):
        for k in range(8):
            up = torch.nn.functional.interpolate(
                a[n : n + 1, k : k + 1], size=(16, 16), mode="bilinear", align_corners=True
            )
            mask = (up - up.min()) / (up.max() - up.min() + 1e-8)
            naive[n, k] = model(x[n : n + 1] * mask)[0, explanation.targets[n]]
    expected = torch.softmax(naive, dim=1)
    assert torch.allclose(explanation.extras["weights"], expected.detach(), atol=1e-6)


def test_empty_batch_gives_empty_explanation(tv_model):
    model = tv_model("resnet18")
    explanation = fastxai.gradcam(model, torch.zeros(0, 3, 64, 64), "layer4")
    assert explanation.maps.shape == (0, 64, 64)
    assert explanation.targets.shape == (0,)
    assert len(explanation) == 0


def test_reshape_transform_for_token_outputs(images):
    class TokenNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.block = nn.Linear(8, 8)
            self.head = nn.Linear(8, 5)

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
            return self.head(torch.relu(self.block(tokens)).mean(1))

    torch.manual_seed(0)
    model = TokenNet().eval()
    x = images(2, 16)
    with pytest.raises(ValueError, match="reshape_transform"):
        fastxai.gradcam(model, x, "block")

    def to_map(t):
        return t.transpose(1, 2).reshape(t.shape[0], 8, 4, 4)

    explanation = fastxai.gradcam(model, x, "block", reshape_transform=to_map)
    assert explanation.raw.shape == (2, 4, 4)
    tokens = model.embed(x).flatten(2).transpose(1, 2)
    a = model.block(tokens).detach().requires_grad_(True)
    logits = model.head(torch.relu(a).mean(1))
    (g,) = torch.autograd.grad(logits.gather(1, explanation.targets[:, None]).sum(), a)
    expected = (to_map(g).mean((2, 3))[:, :, None, None] * to_map(a)).sum(1)
    assert torch.allclose(explanation.raw, expected.detach(), atol=1e-6)
