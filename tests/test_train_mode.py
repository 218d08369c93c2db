"""Models in training mode: explained as they are (BatchNorm with the batch's statistics), at
every layer, with no buffer updated; the compat classes explain them in eval mode as
pytorch-grad-cam does, and give every module its mode back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

import fastxai
from fastxai import compat

# resnet18 layers that each have a BatchNorm after them: torch.func refused the in-place update
# of BatchNorm's running statistics there
LAYERS = ["conv1", "layer1.0.conv1", "layer1.1.conv2", "layer2.0.conv1", "layer3.1", "layer4"]


def train_mode_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():  # non-trivial running statistics, unlike the batch's
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.train()


def hooked_gradcam_raw(model: nn.Module, x: Tensor, layer: str, classes: Tensor) -> Tensor:
    """Grad-CAM's raw map ``sum_k mean_ij(dy/dA_k) A_k`` by a forward hook and autograd on a
    deep copy whose BatchNorms use batch statistics without tracking them."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
    kept: list[Tensor] = []
    model.get_submodule(layer).register_forward_hook(lambda m, i, o: kept.append(o))
    logits = model(x)
    score = logits.gather(1, classes[:, None]).sum()
    (gradient,) = torch.autograd.grad(score, kept[0])
    return (gradient.mean((2, 3), keepdim=True) * kept[0]).sum(1).detach()


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


@pytest.mark.parametrize("layer", LAYERS)
def test_train_mode_gradcam_uses_batch_statistics_and_updates_nothing(layer: str) -> None:
    model = train_mode_resnet()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = buffers(model)
    with pytest.warns(UserWarning, match="training mode: it is explained as it is") as record:
        explanation = fastxai.gradcam(model, x, layer, [1, 4, 7])
    assert record[0].filename == __file__  # the warning points at the caller's line
    expected = hooked_gradcam_raw(model, x, layer, torch.tensor([1, 4, 7]))
    # float32 reference by a different route (hooks + autograd against FX split + vjp)
    scale = float(expected.abs().max())
    torch.testing.assert_close(explanation.raw, expected, rtol=1e-4, atol=1e-5 * scale)
    eval_raw = fastxai.gradcam(copy.deepcopy(model).eval(), x, layer, [1, 4, 7]).raw
    assert not torch.allclose(explanation.raw, eval_raw, atol=1e-3 * scale)  # not eval mode
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    assert all(m.training for m in model.modules())


def test_train_mode_other_entry_points_update_no_buffer() -> None:
    model = train_mode_resnet()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    before = buffers(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastxai.layercam(model, x, ["layer2", "layer4"])
        fastxai.gradcam(model, x, "layer4", tft=True)
        fastxai.scorecam(model, x, "layer4")
        with pytest.raises(ValueError):
            fastxai.gradcam(model, x, "layer4", [0, 99])  # class out of range, after a forward
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name


class CountingModule(nn.Module):
    """A custom module with its own in-place counter (not a BatchNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.calls += 1
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


def test_other_in_place_buffer_updates_are_undone() -> None:
    model = CountingModule().train()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fastxai.gradcam(model, x, "conv", tft=True)
    assert float(model.calls) == 0.0


def test_compat_explains_train_mode_models_in_eval_mode_and_restores_modes() -> None:
    model = train_mode_resnet()
    model.layer2.eval()  # a mixed model: each module's own mode must come back
    modes = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    before = buffers(model)
    cam = compat.GradCAM(model, [model.layer4])
    maps = cam(x, None)
    assert [m.training for m in model.modules()] == modes
    for name, value in buffers(model).items():
        assert torch.equal(value, before[name]), name
    reference = copy.deepcopy(model).eval()
    expected = compat.GradCAM(reference, [reference.layer4])(x, None)
    torch.testing.assert_close(torch.from_numpy(maps), torch.from_numpy(expected))
    with pytest.raises(IndexError):
        cam(x, [lambda out: out[99]])  # raises after the forward: modes still come back
    assert [m.training for m in model.modules()] == modes


def test_compat_matches_pytorch_grad_cam_on_a_train_mode_model() -> None:
    pgc = pytest.importorskip("pytorch_grad_cam")
    model = train_mode_resnet()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    ours = compat.GradCAM(model, [model.layer3])(x, None)
    assert model.training
    theirs_model = copy.deepcopy(model)  # pytorch-grad-cam switches it to eval mode itself
    theirs = pgc.GradCAM(theirs_model, [theirs_model.layer3])(x, None)
    assert not theirs_model.training
    # pytorch-grad-cam's own float32 error against float64 is ~1e-6 on maps in [0, 1]
    assert abs(ours - theirs).max() < 1e-4
