"""AFT tuner, Eq. 8 trainer (frozen layers, resume, compile) and the Fashion-MNIST loader."""

from __future__ import annotations

import copy
import gzip
import math
import struct

import pytest
import torch
import torchvision

from fastxai.aft import AFTConfig, AFTTrainer, FashionCNN, Tuner, train_aft, tuner_loss
from fastxai.aft.data import INSTALL_COMMAND, fashion_mnist_missing, load_fashion_mnist, read_idx
from fastxai.aft.trainer import frozen_parameter_names


def manual_tuner(tuner: Tuner, a: torch.Tensor) -> torch.Tensor:
    """sigmoid(w2 . relu(W1 a + b1) + b2) at every position, written out with einsum."""
    w1 = tuner.reduce.weight[:, :, 0, 0]
    w2 = tuner.project.weight[:, :, 0, 0]
    hidden = torch.einsum("ok,nkhw->nohw", w1, a) + tuner.reduce.bias[None, :, None, None]
    if tuner.linear:
        return torch.einsum("ok,nkhw->nohw", w2, hidden) + tuner.project.bias[None, :, None, None]
    z = torch.einsum("ok,nkhw->nohw", w2, hidden.relu()) + tuner.project.bias[None, :, None, None]
    return torch.sigmoid(z)


@pytest.mark.parametrize("linear", [False, True])
def test_tuner_matches_manual_formula_and_shapes(linear: bool) -> None:
    torch.manual_seed(0)
    tuner = Tuner(5, linear=linear).double()
    a = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    out = tuner(a)
    assert out.shape == (2, 1, 3, 4)
    torch.testing.assert_close(out, manual_tuner(tuner, a), rtol=1e-12, atol=1e-12)
    if not linear:
        assert bool((out > 0).all()) and bool((out < 1).all())


def test_tuner_gradients_match_analytic_formula() -> None:
    torch.manual_seed(1)
    tuner = Tuner(4).double()
    a = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 2, 2, dtype=torch.float64)
    loss = tuner_loss(tuner(a), target, reduction="sum")
    loss.backward()
    # d loss / d b2 = (1/N) sum 2 (t - m) s (1 - s), with t = s = sigmoid(z).
    with torch.no_grad():
        s = manual_tuner(tuner, a)[:, 0]
        expected_b2 = (2 * (s - target) * s * (1 - s)).sum() / 3
        hidden = (
            torch.einsum("ok,nkhw->nohw", tuner.reduce.weight[:, :, 0, 0], a)
            + tuner.reduce.bias[None, :, None, None]
        ).relu()
        expected_w2 = torch.einsum("nhw,nohw->o", 2 * (s - target) * s * (1 - s), hidden) / 3
    torch.testing.assert_close(tuner.project.bias.grad[0], expected_b2)
    torch.testing.assert_close(tuner.project.weight.grad[0, :, 0, 0], expected_w2)
    assert torch.autograd.gradcheck(lambda t: tuner(t), (a.detach().requires_grad_(),))


def test_tuner_loss_reductions() -> None:
    tuned = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]])
    target = torch.tensor([[[1.0, 1.0], [0.5, 0.25]]])
    assert float(tuner_loss(tuned, target, "sum")) == pytest.approx(0.25 + 0.25)
    assert float(tuner_loss(tuned[:, None], target, "mean")) == pytest.approx(0.5 / 4)
    with pytest.raises(ValueError, match="differ"):
        tuner_loss(tuned, torch.zeros(1, 3, 3))


def tiny_problem(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = FashionCNN(width=4).eval()
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    # A learnable target: the fraction of positive pixels of each 4x4 cell.
    targets = torch.nn.functional.adaptive_avg_pool2d((x > 0.5).float(), 4)[:, 0]
    return model, x, y, targets


FAST = {"batch_size": 16, "lr": 0.05, "progress": False}


def test_frozen_layers_bitwise_unchanged_and_user_model_untouched() -> None:
    model, x, y, targets = tiny_problem()
    before = copy.deepcopy(model.state_dict())
    result = train_aft(model, "layer3", x, y, targets, AFTConfig(epochs=2, **FAST))
    for name, value in model.state_dict().items():  # the caller's model is never changed
        assert torch.equal(value, before[name]), name
    for name, value in result.state_dict.items():
        if name.startswith(("layer1.", "layer2.")) or "running" in name or "num_batches" in name:
            assert torch.equal(value, before[name]), f"{name} changed"
    for name in ("layer3.0.weight", "layer3.1.weight", "fc.weight", "fc.bias"):
        assert not torch.equal(result.state_dict[name], before[name]), f"{name} not trained"
    assert set(result.state_dict) == set(before)  # the original architecture, no tuner inside
    assert not model.training


def test_frozen_parameters_of_a_resnet_are_those_before_the_layer() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    frozen = set(frozen_parameter_names(model, "layer4", torch.randn(1, 3, 32, 32)))
    expected = {n for n, _ in model.named_parameters() if not n.startswith(("layer4.", "fc."))}
    assert frozen == expected


def test_mask_term_is_learned() -> None:
    model, x, y, targets = tiny_problem()
    cfg = AFTConfig(epochs=8, lam=10.0, optimizer="adam", lr=1e-2, batch_size=16, progress=False)
    history = train_aft(model, "layer3", x, y, targets, cfg).history
    assert history[-1]["mask"] < 0.75 * history[0]["mask"]


@pytest.mark.parametrize("linear", [False, True])
def test_tuner_start_at_outputs_the_constant(linear: bool) -> None:
    torch.manual_seed(0)
    tuner = Tuner(6, linear=linear)
    tuner.start_at(0.8)
    out = tuner(torch.randn(3, 6, 4, 5) * 10)
    torch.testing.assert_close(out, torch.full((3, 1, 4, 5), 0.8))
    assert torch.equal(tuner.project.weight, torch.zeros_like(tuner.project.weight))


def test_mean_tuner_init_starts_at_the_targets_mean_and_sends_no_first_gradient() -> None:
    """``tuner_init="mean"``: the tuner outputs the targets' mean m (sigmoid bias logit(m)), so
    one full-batch SGD step with lambda = 10 changes the network exactly as lambda = 0 does; with
    a random tuner the mask term moves layer 3 at once."""
    model, x, y, targets = tiny_problem(n=32)
    m = float(targets.mean())
    start = train_aft(model, "layer3", x, y, targets, AFTConfig(epochs=0, tuner_init="mean"))
    assert float(start.tuner["project.bias"]) == pytest.approx(math.log(m / (1 - m)), rel=1e-6)
    assert not start.tuner["project.weight"].any()
    one_step = {"epochs": 1, "batch_size": 32, "lr": 0.05, "progress": False}
    results = {
        (init, lam): train_aft(
            model, "layer3", x, y, targets, AFTConfig(lam=lam, tuner_init=init, **one_step)
        ).state_dict
        for init in ("mean", "random")
        for lam in (0.0, 10.0)
    }
    for name, value in results["mean", 0.0].items():
        torch.testing.assert_close(results["mean", 10.0][name], value, rtol=0, atol=1e-7)
    assert not torch.allclose(
        results["random", 10.0]["layer3.0.weight"], results["random", 0.0]["layer3.0.weight"]
    )
    with pytest.raises(ValueError, match="tuner_init"):
        AFTConfig(tuner_init="zeros")


def test_resume_gives_the_uninterrupted_result(tmp_path) -> None:
    model, x, y, targets = tiny_problem()
    full = train_aft(model, "layer3", x, y, targets, AFTConfig(epochs=3, **FAST))
    checkpoint = tmp_path / "aft.ckpt"
    first = train_aft(model, "layer3", x, y, targets, AFTConfig(epochs=1, **FAST), checkpoint)
    assert not torch.equal(first.state_dict["fc.weight"], full.state_dict["fc.weight"])
    resumed = train_aft(model, "layer3", x, y, targets, AFTConfig(epochs=3, **FAST), checkpoint)
    for name, value in full.state_dict.items():
        assert torch.equal(resumed.state_dict[name], value), name
    for name, value in full.tuner.items():
        assert torch.equal(resumed.tuner[name], value), name
    assert resumed.history == full.history
    with pytest.raises(ValueError, match="lr"):
        train_aft(
            model, "layer3", x, y, targets, AFTConfig(epochs=4, **{**FAST, "lr": 0.1}), checkpoint
        )


def test_compiled_training_matches_eager() -> None:
    model, x, y, targets = tiny_problem(n=32)
    eager = AFTTrainer(model, "layer3", AFTConfig(epochs=1, **FAST)).fit(x, y, targets)
    compiled = AFTTrainer(model, "layer3", AFTConfig(epochs=1, compile=True, **FAST)).fit(
        x, y, targets
    )
    for name, value in eager.state_dict.items():
        torch.testing.assert_close(compiled.state_dict[name], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(eager.state_dict["fc.weight"], model.state_dict()["fc.weight"])


def test_config_and_input_errors() -> None:
    model, x, y, targets = tiny_problem(n=8)
    with pytest.raises(ValueError, match="optimizer"):
        AFTConfig(optimizer="lbfgs")
    with pytest.raises(ValueError, match="one row per training image"):
        train_aft(model, "layer3", x, y[:4], targets, AFTConfig(**FAST))
    with pytest.raises(ValueError, match="differ"):
        train_aft(model, "layer3", x, y, targets[:, :2], AFTConfig(**FAST))


def write_idx(path, array: torch.Tensor) -> None:
    header = bytes([0, 0, 8, array.dim()]) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.numpy().tobytes())


def test_read_idx_round_trip_and_bad_magic(tmp_path) -> None:
    data = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", data)
    assert torch.equal(read_idx(tmp_path / "x.gz"), data)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")


def test_missing_dataset_names_the_install_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


@pytest.mark.skipif(fashion_mnist_missing() is not None, reason=f"needs `{INSTALL_COMMAND}`")
def test_fashion_mnist_files() -> None:
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    train_images, train_labels = load_fashion_mnist("train")
    assert train_images.shape == (60000, 28, 28)
    assert torch.equal(train_labels.bincount(), torch.full((10,), 6000))
    # The published normalisation constants are the training set's statistics.
    pixels = train_images.float() / 255
    assert float(pixels.mean()) == pytest.approx(0.2860, abs=5e-4)
    assert float(pixels.std()) == pytest.approx(0.3530, abs=5e-4)
