"""SRD (Han, Kim and Kwak, ICLR 2024): conservation, ERF, linearity, batching, zero vectors,
APOP, bad input, and the promise never to change the model or the input."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vgg import VGG, make_layers

import fastxai
from fastxai.decomposition import (
    UnsupportedModelError,
    apop,
    apop_agreement,
    fast,
    srd,
    srd_erf,
)
from fastxai.decomposition.explain import decompose, record
from fastxai.decomposition.heads import propagate
from fastxai.decomposition.trace import LinearSource, Unit


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize(("name", "size"), [("resnet18", 64), ("resnet50", 64)])
def test_identity_rule_input_map_sums_to_the_logit(tv_model, images, name, size):
    model = tv_model(name)
    x = images(2, size)
    explanation = srd(model, x, rule="identity")
    logit = explanation.logits.gather(1, explanation.targets[:, None])[:, 0]
    assert torch.allclose(explanation.raw.sum((1, 2)), logit, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(explanation.logits, model(x), rtol=1e-4, atol=1e-4)
    assert explanation.raw.shape == (2, size, size)
    assert torch.equal(explanation.targets, explanation.logits.argmax(1))


def test_vgg_heads_conserve_what_they_start_with(tv_model, images):
    model = tv_model("vgg16_bn")
    x = images(2, 32)
    pure = srd(model, x, rule="identity", vgg_head="pure_srd", return_relevance=True)
    logit = pure.logits.gather(1, pure.targets[:, None])[:, 0]
    assert torch.allclose(pure.raw.sum((1, 2)), logit, rtol=1e-4, atol=1e-5)
    assert not pure.extras["paper_setting"] and pure.extras["head"] == "pure_srd"
    for slot in ("classifier.1", "classifier.4", "features.42"):
        assert torch.allclose(pure.extras["relevance"][slot].sum((1, 2)), logit, rtol=1e-4)
    paper = srd(model, x, rule="identity", return_relevance=True)
    start = paper.extras["relevance"]["features.42"]
    assert paper.extras["paper_setting"] and paper.extras["head"] == "gradcam"
    assert float(start.sum()) > 0
    assert torch.allclose(paper.raw.sum((1, 2)), start.sum((1, 2)), rtol=1e-4)


def test_vgg_gradcam_head_is_fastxai_gradcam_at_the_last_conv(tv_model, images):
    model = tv_model("vgg16")
    x = images(2, 64)
    explanation = srd(model, x, targets=[3, 7], rule="identity", return_relevance=True)
    expected = fastxai.gradcam(model, x, "features.28", [3, 7]).raw.clamp_min(0)
    assert float(expected.max()) > 0
    assert _rel(explanation.extras["relevance"]["features.29"], expected) < 1e-4


def test_contrastive_rule_sums_to_zero_and_maps_are_scaled(tv_model, images):
    explanation = srd(tv_model("resnet18"), images(2, 64))
    raw = explanation.raw
    assert float(raw.sum((1, 2)).abs().max()) < 1e-4 * float(raw.abs().sum((1, 2)).min())
    maps = explanation.maps
    assert torch.allclose(maps.flatten(1).amin(1), torch.zeros(2))
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2), atol=1e-6)
    scaled = (raw - raw.flatten(1).amin(1)[:, None, None]) / (
        raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
    )[:, None, None]
    assert torch.allclose(maps, scaled, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet50", "vgg16_bn"])
def test_every_unit_conserves(tv_model, images, name):
    model = tv_model(name)
    with torch.no_grad():
        trace, _, relevance, _ = decompose(model, images(1, 32), None, "contrastive", "gradcam")
        for unit in trace.units:
            r_out = relevance[unit.name]
            passed = sum(r.sum() for _, r in fast.unit_backward(unit, r_out))
            assert abs(float(passed - r_out.sum())) <= 1e-4 * float(r_out.abs().sum()), unit.name


@pytest.mark.parametrize(
    ("name", "layer", "position"),
    [
        ("resnet50", "layer3.1.relu@1", (1, 2)),
        ("resnet18", "layer2", (3, 0)),
        ("vgg16", "features.15", (5, 4)),
        ("vgg16", "features.14", (0, 0)),  # the conv's name means its unit's output
    ],
)
def test_erf_sums_to_one(tv_model, images, name, layer, position):
    erf = srd_erf(tv_model(name), images(2, 64), layer, position)
    assert torch.allclose(erf.raw.sum((1, 2)), torch.ones(2), atol=1e-4)
    assert torch.equal(erf.targets, torch.full((2,), -1))


def test_erf_stays_inside_the_receptive_field(tv_model, images):
    erf = srd_erf(tv_model("resnet18"), images(1, 64), "layer1.0", (0, 0)).raw[0]
    # stem 7x7/2, pool 3x3/2, two 3x3 convs: the PFV at (0, 0) sees rows and columns < 32
    assert float(erf[:32, :32].abs().sum()) > 0
    assert float(erf[32:].abs().max()) == 0 and float(erf[:, 32:].abs().max()) == 0


def test_linear_in_the_initial_relevance(tv_model, images):
    with torch.no_grad():
        trace = record(tv_model("resnet18"), images(2, 48))
        h, w = trace.slot_sizes[trace.head_slot]
        g = torch.Generator().manual_seed(5)
        r1, r2 = torch.randn(2, h, w, generator=g), torch.randn(2, h, w, generator=g)

        def run(r: torch.Tensor) -> torch.Tensor:
            return propagate(trace.units, {trace.head_slot: r}, fast.unit_backward)["input"]

        combined = run(2.5 * r1 - 0.5 * r2)
    assert _rel(combined, 2.5 * run(r1) - 0.5 * run(r2)) < 1e-5


@pytest.mark.parametrize(("name", "rule"), [("resnet18", "contrastive"), ("vgg16_bn", "identity")])
def test_a_batch_of_classes_equals_a_loop_over_classes(tv_model, images, name, rule):
    model = tv_model(name)
    x = images(1, 64 if name == "resnet18" else 32)  # resnet18's layer4 is 2 x 2 at 64
    classes = [0, 17, 999]
    batch = srd(model, x.expand(3, -1, -1, -1), classes, rule=rule)
    for i, c in enumerate(classes):
        single = srd(model, x, c, rule=rule)
        # float32 convolutions of 3 images and of 1 sum in different orders (1.8e-5 seen with
        # one thread on vgg16_bn)
        assert _rel(batch.raw[i], single.raw[0]) < 1e-4
    assert _rel(batch.raw[0], batch.raw[1]) > 1e-2  # the classes do differ


def _tiny_vgg() -> nn.Module:
    """A two-unit VGG with zero biases (built on the meta device first: torchvision's VGG
    constructor would allocate and initialise its 120M-parameter classifier)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=5, init_weights=False)
    model.features = make_layers([8, "M", 8, "M"])
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Dropout(), nn.Linear(16, 5))
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.zeros_(module.bias)
    return model.eval()


def test_zero_preactivation_vectors_give_no_nan():
    model = _tiny_vgg()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[:, :, :, :8] = 0  # the first conv (bias 0) has v_hat = 0 well inside this half
    x[1] = 0  # all-zero image: every v_hat is 0
    for head in ("gradcam", "pure_srd"):
        explanation = srd(model, x, rule="identity", vgg_head=head, return_relevance=True)
        for value in explanation.extras["relevance"].values():
            assert bool(torch.isfinite(value).all())
        assert bool(torch.isfinite(explanation.maps).all())
        assert float(explanation.raw[0, :, :8].abs().max()) == 0  # zero pixels get nothing
        assert float(explanation.raw[0].abs().sum()) > 0
        assert float(explanation.raw[1].abs().max()) == 0


def test_identity_shortcut_splits_by_its_projection():
    g = torch.Generator().manual_seed(0)
    shortcut = torch.randn(2, 6, 4, 4, generator=g)
    main_in = torch.randn(2, 5, 4, 4, generator=g)
    weight = torch.randn(6, 5, 1, 1, generator=g)
    main_out = torch.nn.functional.conv2d(main_in, weight)
    preact = main_out + shortcut
    unit = Unit(
        "out",
        preact,
        [LinearSource("main", main_in, weight), LinearSource("block_in", shortcut, None)],
    )
    relevance = torch.randn(2, 4, 4, generator=g)
    parts = dict(fast.unit_backward(unit, relevance))
    expected = (shortcut * preact).sum(1) / preact.square().sum(1) * relevance
    assert torch.allclose(parts["block_in"], expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(parts["main"] + parts["block_in"], relevance, atol=1e-5)


def test_apop_replays_the_activation_pattern(tv_model, images):
    model = tv_model("resnet18")
    x, other = images(3, 32, seed=1), images(3, 32, seed=2)
    with torch.no_grad():
        assert torch.allclose(apop(model, x, x), model(x), rtol=1e-4, atol=1e-4)
        gated = apop(model, x, other)
        assert not torch.allclose(gated, model(other), atol=1e-2)
        # with the pattern fixed the network is affine in its input
        mixed = apop(model, x, 0.3 * x + 0.7 * other)
        assert torch.allclose(mixed, 0.3 * apop(model, x, x) + 0.7 * gated, rtol=1e-3, atol=1e-3)
    assert apop_agreement(model, x, x) == 1.0
    zeros_agreement = apop_agreement(model, x, torch.zeros_like(x))
    assert 0.0 <= zeros_agreement <= 1.0


def test_apop_on_vgg_gates_the_classifier_too(tv_model, images):
    model = tv_model("vgg16")
    x, other = images(2, 32, seed=1), images(2, 32, seed=2)
    with torch.no_grad():
        assert torch.allclose(apop(model, x, x), model(x), rtol=1e-4, atol=1e-5)
        mixed = apop(model, x, 0.5 * x + 0.5 * other)
        half = 0.5 * apop(model, x, x) + 0.5 * apop(model, x, other)
        assert torch.allclose(mixed, half, rtol=1e-3, atol=1e-5)


def test_runs_under_inference_mode_and_on_float64(tv_model, images):
    model = tv_model("vgg16")
    x = images(1, 32)
    with torch.inference_mode():
        inside = srd(model, x)
    assert _rel(inside.raw, srd(model, x).raw) < 1e-6
    model64 = copy.deepcopy(tv_model("resnet18")).double()
    explanation = srd(model64, images(1, 32).double(), rule="identity")
    logit = explanation.logits.gather(1, explanation.targets[:, None])[:, 0]
    assert explanation.raw.dtype == torch.float64
    assert torch.allclose(explanation.raw.sum((1, 2)), logit, rtol=1e-10)


def test_empty_batch(tv_model):
    explanation = srd(tv_model("resnet18"), torch.zeros(0, 3, 32, 32))
    assert explanation.maps.shape == (0, 32, 32) and explanation.targets.shape == (0,)


def _resnet_with_identity_block() -> nn.Module:
    resnet = torchvision.models.resnet18(weights=None).eval()
    resnet.layer2[1] = nn.Identity()
    return resnet


def _vgg_with(part: str, index: int, module: nn.Module) -> nn.Module:
    vgg = _tiny_vgg()
    getattr(vgg, part)[index] = module
    return vgg


UNSUPPORTED = {
    "Sequential": lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()),
    "SqueezeNet": lambda: torchvision.models.squeezenet1_1(weights=None).eval(),
    "Identity": _resnet_with_identity_block,
    "GELU": lambda: _vgg_with("features", 1, nn.GELU()),
    "Tanh": lambda: _vgg_with("classifier", 1, nn.Tanh()),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_modules_are_named(kind):
    with pytest.raises(UnsupportedModelError, match=kind):
        srd(UNSUPPORTED[kind](), torch.randn(1, 3, 32, 32))


def test_bad_input_errors_name_the_argument(tv_model, images):
    model = tv_model("resnet18")
    x = images(1, 32)
    cases = [
        (lambda: srd(model, x, rule="sum"), ValueError, "rule"),
        (lambda: srd(model, x, vgg_head="fc"), ValueError, "vgg_head"),
        (lambda: srd(model, x[0]), ValueError, "x must have shape"),
        (lambda: srd(model, torch.cat([x, x[:, :1]], 1)), ValueError, "x has 4 channels"),
        (lambda: srd(model, x.double()), TypeError, "x is torch.float64"),
        (lambda: srd(model, torch.full_like(x, float("nan"))), ValueError, "NaN"),
        (lambda: srd(model, x, 1000), ValueError, "targets"),
        (lambda: srd(model, x, [1, 2]), ValueError, "targets"),
        (lambda: srd(model, x, lambda out: out[0]), TypeError, "targets"),
        (lambda: srd("resnet18", x), TypeError, "model"),
        (lambda: srd_erf(model, x, "layer9", (0, 0)), ValueError, "layer 'layer9'"),
        (lambda: srd_erf(model, x, "maxpool", (0, 0)), ValueError, "layer 'maxpool'"),
        (lambda: srd_erf(model, x, "layer4", (5, 0)), ValueError, "position"),
        (lambda: srd_erf(model, x, "layer4", 0), TypeError, "position"),
        (lambda: apop(model, x, images(2, 32)), ValueError, "x_other"),
        (lambda: apop(model, x, x[:, :, :2]), ValueError, "x_other"),
        (lambda: apop(model, x[0], x), ValueError, "x_pattern"),
        (lambda: srd(tv_model("vgg16"), images(1, 16)), ValueError, "too small"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_training_mode_is_refused_without_changing_it(images):
    model = _tiny_vgg().train()
    with pytest.raises(ValueError, match="eval"):
        srd(model, images(1, 16))
    assert all(m.training for m in model.modules())


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grad": [p.grad is None for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


@pytest.mark.parametrize("name", ["resnet18", "vgg16_bn"])
def test_model_and_input_are_never_changed(tv_model, images, name):
    model = tv_model(name)
    x = images(2, 32)
    x_before = x.clone()
    before = _snapshot(model)
    srd(model, x, return_relevance=True)
    srd(model, x, vgg_head="pure_srd")
    srd_erf(model, x, "layer1" if name == "resnet18" else "features.2", (0, 0))
    apop(model, x, torch.zeros_like(x))
    with pytest.raises(ValueError):
        srd(model, x, targets=5000)
    after = _snapshot(model)
    assert torch.equal(x, x_before)
    # The model comes from a shared cache: other tests may have left .grad set; it must not change.
    assert before["requires_grad"] == after["requires_grad"] and before["grad"] == after["grad"]
    assert before["training"] == after["training"] and before["hooks"] == after["hooks"]
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


@pytest.mark.parametrize("cfg", ["A", "B", "D", "E"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_vgg_depth_conserves_through_the_pure_head(cfg, batch_norm):
    """vgg11/13/16/19 features (with and without BN) under a small classifier."""
    from torchvision.models.vgg import cfgs

    torch.manual_seed(0)
    with torch.device("meta"):
        model = VGG(nn.Sequential(), num_classes=10, init_weights=False)
    model.features = make_layers(cfgs[cfg], batch_norm=batch_norm)
    model.avgpool = nn.AdaptiveAvgPool2d((2, 2))
    model.classifier = nn.Sequential(
        nn.Linear(512 * 4, 32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10)
    )
    model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    explanation = srd(model, x, rule="identity", vgg_head="pure_srd")
    logit = explanation.logits.gather(1, explanation.targets[:, None])[:, 0]
    with torch.no_grad():
        assert torch.allclose(explanation.logits, model(x), rtol=1e-4, atol=1e-5)
    assert torch.allclose(explanation.raw.sum((1, 2)), logit, rtol=1e-4, atol=1e-6)


def test_cli_helpers(tv_model, images):
    from fastxai.decomposition.present import (
        DEMO_SKIP_MESSAGE,
        explain_with_srd,
        unsupported_model_message,
    )

    model = tv_model("resnet18")
    x = images(1, 64)
    assert torch.equal(explain_with_srd(model, x, "layer4", 3).raw, srd(model, x, 3).raw)
    assert unsupported_model_message(model, "resnet18") is None
    message = unsupported_model_message(UNSUPPORTED["SqueezeNet"](), "squeezenet1_1")
    assert message is not None and "squeezenet1_1 (SqueezeNet) is not supported" in message
    assert "EfficientNet-Lite0" in DEMO_SKIP_MESSAGE and "--method srd" in DEMO_SKIP_MESSAGE
