"""The tables the reliability suite runs: every public entry point, and malformed inputs.

To cover a new public function, add rows here; every test of the suite picks them up:

* ``ENTRY_POINTS``: ``Entry(name, run)`` where ``run(model, x, targets)`` calls the function on
  ``model`` (by default a small CNN, ``SmallNet``: layers ``"block"`` and ``"features"``, 5
  classes; ``make_model=`` gives another, e.g. a torchvision ResNet for a method that needs one)
  and images ``x`` ``(N, 3, image_size, image_size)`` with ``targets`` (``None`` for the top-1
  class, or a callable that raises midway) and returns something holding tensors (compared
  bitwise by the determinism test through :func:`tensors_of`). ``takes_targets=False`` for
  functions without a ``targets`` argument, which then need ``midway``: another way to fail
  after part of the work ran.
* ``BAD_INPUTS``: ``Bad(id, call, error, match)``: ``call()`` must raise ``error`` with a message
  matching ``match`` (which should name the argument).
"""

from __future__ import annotations

import dataclasses
import functools
import tempfile
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn

import fastxai
from fastxai import compat, metrics
from fastxai.io import read_shards
from fastxai.nn import Explainer
from fastxai.stream import explain_dataset, explain_stream

NUM_CLASSES = 5


class SmallNet(nn.Module):
    """Stem with BatchNorm, a residual block (``"block"``), a strided ``"features"`` stage and a
    pooled linear head: the capture paths of a torchvision ResNet, traced in milliseconds."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True))
        self.features = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        return self.fc(self.pool(self.features(h)).flatten(1))


def small_net(seed: int = 0) -> SmallNet:
    torch.manual_seed(seed)
    model = SmallNet()
    with torch.no_grad():
        model.stem[1].running_mean.uniform_(-0.2, 0.2)
        model.stem[1].running_var.uniform_(0.5, 1.5)
    return model.eval()


class NoSpatial(nn.Module):
    """An MLP: no layer has a spatial map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.body(x))


class TinyViT(nn.Module):
    """Patch tokens plus a class token through one block: ``"block"`` outputs ``(N, 1 + hw, C)``
    like a ViT layer, so CAM methods need a ``reshape_transform`` there."""

    def __init__(self, dim: int = 8, patch: int = 4) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.block = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], 1)
        return self.head(self.block(tokens)[:, 0])


def vit_reshape(tokens: Tensor) -> Tensor:
    n, length, c = tokens.shape
    side = int((length - 1) ** 0.5)
    return tokens[:, 1:].reshape(n, side, side, c).permute(0, 3, 1, 2)


def images(n: int = 2, size: int = 32, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tensors_of(result: Any) -> list[Tensor]:
    """Every tensor a result holds (Explanation fields and extras, dataclasses, arrays)."""
    if isinstance(result, Tensor):
        return [result]
    if isinstance(result, np.ndarray):
        return [torch.from_numpy(result)]
    if isinstance(result, dict):
        return [t for key in sorted(result, key=str) for t in tensors_of(result[key])]
    if isinstance(result, (list, tuple)):
        return [t for item in result for t in tensors_of(item)]
    if dataclasses.is_dataclass(result):
        return [t for f in dataclasses.fields(result) for t in tensors_of(getattr(result, f.name))]
    return []


Run = Callable[[nn.Module, Tensor, Any], Any]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One public entry point. ``run(model, x, targets)``; ``midway(model, x)`` fails after
    some of the work ran (defaults to ``run`` with a target callable that raises)."""

    name: str
    run: Run
    takes_targets: bool = True
    midway: Callable[[nn.Module, Tensor], Any] | None = None
    make_model: Callable[[], nn.Module] = lambda: small_net(3)
    image_size: int = 32


class Boom(RuntimeError):
    """Raised on purpose in the middle of a call."""


def exploding_target(output: Tensor) -> Tensor:
    raise Boom("target callable failed midway")


def _method(name: str, layer: str = "features", **options: Any) -> Run:
    return lambda m, x, t: fastxai.METHODS[name](m, x, layer, t, **options)


def _maps(m: nn.Module, x: Tensor) -> Tensor:
    return fastxai.gradcam(m, x, "features").maps


def _compat(cls: type[compat.BaseCAM]) -> Run:
    def run(m: nn.Module, x: Tensor, t: Any) -> Any:
        with cls(m, [m.features]) as cam:
            return cam(x, None if t is None else [t])

    return run


def _explainer_evaluation(m: nn.Module, x: Tensor, t: Any) -> Any:
    """The Explainer outside a training step (with grad enabled its forward is the step's
    forward, which updates BatchNorm's running statistics: tests/test_nn_training.py)."""
    with torch.no_grad():
        return Explainer(m, "features", tft=True)(x, t)


def _stream(m: nn.Module, x: Tensor, t: Any) -> Any:
    return list(explain_stream(m, x, "features", batch_size=1, tft=True, progress=False))


def _stream_midway(m: nn.Module, x: Tensor) -> Any:
    def data():
        yield x
        raise Boom("data source failed midway")

    return list(explain_stream(m, data(), "features", batch_size=1, progress=False))


def _dataset(m: nn.Module, x: Tensor, t: Any) -> Any:
    with tempfile.TemporaryDirectory() as out:
        explain_dataset(m, x, "features", out, batch_size=1, tft=True, progress=False)
        return read_shards(out)


def _dataset_midway(m: nn.Module, x: Tensor) -> Any:
    with tempfile.TemporaryDirectory() as out:
        return explain_dataset(m, x, "features", out, targets=99, progress=False)


@functools.cache
def _resnet18_weights() -> dict[str, Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict()


def _resnet18() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.load_state_dict(_resnet18_weights())
    return model.eval()


def _matching(m: nn.Module, x: Tensor, t: Any, **options: Any) -> Any:
    return fastxai.activation_matching(
        m,
        x,
        t,
        ["block", "features"],
        steps=2,
        recipe="paper",
        compile=False,
        progress=False,
        **options,
    )


def _matching_stable(m: nn.Module, x: Tensor, t: Any, **options: Any) -> Any:
    return fastxai.activation_matching(m, x, t, ["block", "features"], progress=False, **options)


def _exploding_transform(t: Tensor) -> Tensor:
    raise Boom("reshape_transform failed midway")


# Methods that never evaluate targets: they fail midway in the reshape_transform instead.
CLASS_AGNOSTIC = ("eigencam", "fem", "kpcacam", "randomcam")


def _class_agnostic_midway(name: str) -> Callable[[nn.Module, Tensor], Any]:
    def midway(m: nn.Module, x: Tensor) -> Any:
        return fastxai.METHODS[name](m, x, "features", reshape_transform=_exploding_transform)

    return midway


def _method_entry(name: str) -> Entry:
    if name == "randomcam":  # a fresh seed per call, so that repeated calls can be compared
        return Entry(
            name,
            lambda m, x, t: fastxai.randomcam(
                m, x, "features", t, generator=torch.Generator().manual_seed(0)
            ),
            midway=_class_agnostic_midway(name),
        )
    midway = _class_agnostic_midway(name) if name in CLASS_AGNOSTIC else None
    return Entry(name, _method(name), midway=midway)


def _seeded_numpy(run: Run) -> Run:
    def seeded(m: nn.Module, x: Tensor, t: Any) -> Any:
        np.random.seed(0)
        return run(m, x, t)

    return seeded


def _factorisation(m: nn.Module, x: Tensor, transform: Any = None) -> Any:
    """Deep Feature Factorization with the model's head scoring the concepts."""
    dff = compat.DeepFeatureFactorization(m, m.features, transform, lambda c: m.fc(c))
    return dff(x, n_components=2)


def _factorisation_picture(m: nn.Module, x: Tensor, transform: Any = None) -> Any:
    """run_dff_on_image on the first image, as pytorch-grad-cam's tutorial calls it."""
    picture = (x[0].detach().permute(1, 2, 0).clamp(-1, 1).numpy() + 1) / 2
    return compat.run_dff_on_image(
        m, m.features, lambda c: m.fc(c), picture, x[0], transform, n_components=2, top_k=1
    )


def _labelled_small_net() -> SmallNet:
    """run_dff_on_image names classes from a Hugging Face style ``model.config.id2label``."""
    model = small_net(3)
    model.config = types.SimpleNamespace(id2label={i: f"class {i}" for i in range(NUM_CLASSES)})
    return model


def _compat_entry(name: str) -> Entry:
    cls = getattr(compat, name)
    if name == "DeepFeatureFactorization":  # class-agnostic: fails midway in the transform
        return Entry(
            f"compat.{name}",
            lambda m, x, t: _factorisation(m, x),
            takes_targets=False,
            midway=lambda m, x: _factorisation(m, x, _exploding_transform),
        )
    if name == "run_dff_on_image":
        return Entry(
            f"compat.{name}",
            lambda m, x, t: _factorisation_picture(m, x),
            takes_targets=False,
            midway=lambda m, x: _factorisation_picture(m, x, _exploding_transform),
            make_model=_labelled_small_net,
        )
    if name in ("EigenCAM", "FEM", "KPCA_CAM"):
        return Entry(
            f"compat.{name}",
            _compat(cls),
            midway=lambda m, x: cls(m, [m.features], _exploding_transform)(x),
        )
    if name == "GuidedBackpropReLUModel":  # explains the first image for a class index
        return Entry(
            f"compat.{name}",
            lambda m, x, t: cls(m)(x, t if isinstance(t, int) else None),
            takes_targets=False,
            midway=lambda m, x: cls(m)(x, 10**6),  # refused once the logits exist
        )
    if name == "RandomCAM":  # draws from NumPy's global generator, as pytorch-grad-cam
        return Entry(f"compat.{name}", _seeded_numpy(_compat(cls)))
    return Entry(f"compat.{name}", _compat(cls))


ENTRY_POINTS: list[Entry] = [
    *[_method_entry(name) for name in sorted(fastxai.METHODS)],
    Entry("gradcam tft", _method("gradcam", tft=True)),
    Entry("layercam two layers", _method("layercam", layer=["block", "features"])),
    Entry("scorecam eigen_smooth", _method("scorecam", eigen_smooth=True, batch_size=7)),
    Entry("tft", lambda m, x, t: fastxai.tft(m, x, _maps(m, x), t)),
    Entry(
        "tft percentile soft",
        lambda m, x, t: fastxai.tft(m, x, _maps(m, x), t, mode="percentile", mask="soft"),
    ),
    Entry(
        "average_increase_drop",
        lambda m, x, t: metrics.average_increase_drop(m, x, _maps(m, x), t),
    ),
    Entry(
        "deletion_insertion",
        lambda m, x, t: metrics.deletion_insertion(m, x, _maps(m, x), t, steps=4),
    ),
    Entry(
        "mute_lowest",
        lambda m, x, t: metrics.mute_lowest(_maps(m, x), 0.5),
        False,
        lambda m, x: metrics.mute_lowest(_maps(m, x), 2.0),  # the map is made, then refused
    ),
    Entry("nn.Explainer", _explainer_evaluation),
    *[_compat_entry(name) for name in compat.__all__ if name != "BaseCAM"],
    Entry("explain_stream", _stream, False, _stream_midway),
    Entry("explain_dataset", _dataset, False, _dataset_midway),
    Entry(
        "srd",
        lambda m, x, t: fastxai.srd(m, x, t, return_relevance=True),
        make_model=_resnet18,
        midway=lambda m, x: fastxai.srd(m, x, 10**6),  # refused after the forward pass
    ),
    Entry(
        "srd identity",
        lambda m, x, t: fastxai.srd(m, x, t, rule="identity"),
        make_model=_resnet18,
        midway=lambda m, x: fastxai.srd(m, x, 10**6, rule="identity"),
    ),
    Entry(
        "srd_erf",
        lambda m, x, t: fastxai.srd_erf(m, x, "layer2", (1, 1)),
        False,
        lambda m, x: fastxai.srd_erf(m, x, "layer2", (99, 99)),
        make_model=_resnet18,
    ),
    Entry(
        "apop",
        lambda m, x, t: fastxai.apop(m, x, x.flip(0)),
        False,
        lambda m, x: fastxai.apop(m, x, x[:, :, :16]),
        make_model=_resnet18,
    ),
    Entry(
        "apop_agreement",
        lambda m, x, t: torch.tensor(fastxai.apop_agreement(m, x, x.flip(0))),
        False,
        lambda m, x: fastxai.apop_agreement(m, x, x[:1]),
        make_model=_resnet18,
    ),
    Entry(
        "activation_matching",
        lambda m, x, t: _matching(m, x, t),
        False,
        lambda m, x: _matching(m, x, None, weights={"kl": float("nan")}),
    ),
    Entry(
        "activation_matching stable",
        lambda m, x, t: _matching_stable(m, x, t),
        False,
        lambda m, x: _matching_stable(m, x, None, weights={"kl": float("nan")}),
    ),
]


@dataclasses.dataclass(frozen=True)
class Bad:
    id: str
    call: Callable[[], Any]
    error: type[BaseException]
    match: str


_M = small_net(7)
_X = images(2, 32, seed=7)


def _gc(
    x: Any = None, layer: Any = "features", targets: Any = None, model: Any = None, **kw: Any
) -> Callable[[], Any]:
    return lambda: fastxai.gradcam(
        _M if model is None else model, _X if x is None else x, layer, targets, **kw
    )


def _tft(maps: Any = None, **kw: Any) -> Callable[[], Any]:
    return lambda: fastxai.tft(_M, _X, torch.rand(2, 32, 32) if maps is None else maps, **kw)


BAD_INPUTS: list[Bad] = [
    # shapes and types of x
    Bad("x 3-D", _gc(x=torch.randn(3, 32, 32)), ValueError, r"x must have shape \(N, C, H, W\)"),
    Bad("x 5-D", _gc(x=torch.randn(1, 1, 3, 8, 8)), ValueError, r"x must have shape"),
    Bad("x int", _gc(x=torch.ones(1, 3, 8, 8, dtype=torch.long)), TypeError, r"x must be a float"),
    Bad("x bool", _gc(x=torch.ones(1, 3, 8, 8, dtype=torch.bool)), TypeError, r"x must be a float"),
    Bad("x numpy", _gc(x=np.zeros((1, 3, 8, 8), np.float32)), TypeError, r"x must be a torch"),
    Bad("x list", _gc(x=[[0.0]]), TypeError, r"x must be a torch\.Tensor"),
    Bad(
        "x meta device",
        _gc(x=torch.randn(1, 3, 8, 8, device="meta")),
        ValueError,
        r"x is on meta but the model's parameters are on cpu",
    ),
    Bad("x NaN", _gc(x=torch.full((1, 3, 8, 8), float("nan"))), ValueError, r"x contains NaN"),
    Bad("x Inf", _gc(x=torch.full((1, 3, 8, 8), float("-inf"))), ValueError, r"x contains NaN"),
    # layers
    Bad(
        "layer unknown",
        _gc(layer="featurez"),
        ValueError,
        r"layer 'featurez' is not a submodule.*close matches: features",
    ),
    Bad("layer foreign module", _gc(layer=nn.ReLU()), ValueError, r"layer: the module ReLU"),
    Bad("layer int", _gc(layer=3), TypeError, r"layer must be a module or a dotted name"),
    Bad("layer empty list", _gc(layer=[]), ValueError, r"layer: expected"),
    Bad("layer bad call index", _gc(layer="features@x"), ValueError, r"layer 'features@x'"),
    Bad(
        "layer call index too large",
        _gc(layer="features@3"),
        ValueError,
        r"layer 'features@3': the module is called 1 time",
    ),
    Bad(
        "model without spatial layers",
        lambda: fastxai.gradcam(NoSpatial().eval(), torch.randn(2, 3, 8, 8), "body"),
        ValueError,
        r"layer 'body' yields \(2, 16\); CAM methods need \(N, C, h, w\)",
    ),
    Bad(
        "transformer layer without reshape_transform",
        lambda: fastxai.gradcam(TinyViT().eval(), torch.randn(2, 3, 8, 8), "block"),
        ValueError,
        r"layer 'block' yields \(2, 5, 8\).*pass reshape_transform",
    ),
    Bad(
        "model not a module",
        lambda: fastxai.gradcam(lambda t: t, _X, "features"),
        TypeError,
        r"model must be a torch\.nn\.Module",
    ),
    # targets
    Bad("targets too large", _gc(targets=5), ValueError, r"targets: class 5 is outside \[0, 5\)"),
    Bad("targets negative", _gc(targets=[0, -1]), ValueError, r"targets: class -1 is outside"),
    Bad(
        "targets wrong length",
        _gc(targets=[0, 1, 2]),
        ValueError,
        r"targets has 3 entries for a batch of 2",
    ),
    Bad(
        "targets float tensor",
        _gc(targets=torch.tensor([0.5, 1.0])),
        ValueError,
        r"targets: expected an integer tensor",
    ),
    Bad(
        "targets tensor out of range",
        _gc(targets=torch.tensor([1, 9])),
        ValueError,
        r"targets: class 9 is outside",
    ),
    Bad("targets string", _gc(targets="cat"), TypeError, r"targets"),
    Bad(
        "targets list of strings",
        _gc(targets=["a", "b"]),
        TypeError,
        r"targets: entries must be ints or callables",
    ),
    Bad(
        "cam callable targets",
        lambda: fastxai.cam(_M, _X, "features", lambda o: o[0]),
        ValueError,
        r"targets: CAM explains class indices",
    ),
    Bad(
        "tft callable targets",
        _gc(targets=lambda o: o[0], tft=True),
        ValueError,
        r"targets: TFT needs class indices",
    ),
    # options
    Bad(
        "fusion",
        _gc(layer=["block", "features"], fusion="max"),
        ValueError,
        r"fusion must be 'mean' or 'tanh'",
    ),
    Bad(
        "scorecam batch_size",
        lambda: fastxai.scorecam(_M, _X, "features", batch_size=0),
        ValueError,
        r"batch_size must be an int >= 1",
    ),
    # TFT: maps and thresholds
    Bad(
        "tft maps shape",
        _tft(maps=torch.rand(2, 16, 16)),
        ValueError,
        r"maps must have shape \(2, 32, 32\) like x",
    ),
    Bad(
        "tft maps NaN",
        _tft(maps=torch.full((2, 32, 32), float("nan"))),
        ValueError,
        r"maps contains NaN",
    ),
    Bad(
        "tft maps above 1",
        _tft(maps=torch.rand(2, 32, 32) + 1),
        ValueError,
        r"maps must lie in \[0, 1\]",
    ),
    Bad(
        "tft thresholds above 1",
        _tft(thresholds=[0.1, 1.5]),
        ValueError,
        r"thresholds must lie in \[0, 1\]",
    ),
    Bad(
        "tft thresholds NaN",
        _tft(thresholds=[float("nan")]),
        ValueError,
        r"thresholds must lie in \[0, 1\]",
    ),
    Bad(
        "tft thresholds empty",
        _tft(thresholds=[]),
        ValueError,
        r"thresholds must be a non-empty 1-D sequence",
    ),
    Bad(
        "tft thresholds 2-D",
        _tft(thresholds=torch.rand(2, 2)),
        ValueError,
        r"thresholds must be a non-empty 1-D",
    ),
    Bad("tft thresholds string", _tft(thresholds="0.5"), TypeError, r"thresholds must be"),
    Bad("tft mode", _tft(mode="quantile"), ValueError, r"mode must be 'value' or 'percentile'"),
    Bad("tft mask", _tft(mask="hard"), ValueError, r"mask must be 'binary' or 'soft'"),
    # metrics
    Bad(
        "deletion steps",
        lambda: metrics.deletion_insertion(_M, _X, torch.rand(2, 32, 32), steps=0),
        ValueError,
        r"steps must be a positive int",
    ),
    Bad(
        "increase/drop maps shape",
        lambda: metrics.average_increase_drop(_M, _X, torch.rand(1, 32, 32)),
        ValueError,
        r"maps must have shape",
    ),
    Bad(
        "mute_lowest fraction",
        lambda: metrics.mute_lowest(torch.rand(2, 8, 8), 1.5),
        ValueError,
        r"fraction must lie in \[0, 1\]",
    ),
    # wrappers
    Bad(
        "Explainer method",
        lambda: Explainer(_M, "features", method="gradcam++"),
        ValueError,
        r"method must be one of",
    ),
    Bad(
        "compat target_layers",
        lambda: compat.GradCAM(_M, _M.features),
        ValueError,
        r"target_layers must be a non-empty list",
    ),
    Bad(
        "compat ablation_layer",
        lambda: compat.AblationCAM(_M, [_M.features], ablation_layer=nn.Identity()),
        ValueError,
        r"ablation_layer",
    ),
    Bad(
        "stream batch_size",
        lambda: next(explain_stream(_M, [_X], "features", batch_size=-1)),
        ValueError,
        r"batch_size must be an int >= 1",
    ),
    Bad(
        "stream targets",
        lambda: next(explain_stream(_M, [_X], "features", targets="gt")),
        ValueError,
        r"targets must be 'top1', 'labels' or a class index",
    ),
    Bad(
        "stream autocast dtype",
        lambda: next(explain_stream(_M, [_X], "features", autocast=torch.float64)),
        ValueError,
        r"autocast must be",
    ),
    # SRD, APOP, Activation Matching
    Bad(
        "srd unsupported model",
        lambda: fastxai.srd(_M, _X),
        TypeError,
        r"srd does not support the model type SmallNet",
    ),
    Bad(
        "srd rule",
        lambda: fastxai.srd(_resnet18(), _X, rule="lrp"),
        ValueError,
        r"rule must be one of",
    ),
    Bad(
        "srd_erf position",
        lambda: fastxai.srd_erf(_resnet18(), _X, "layer2", (99, 0)),
        ValueError,
        r"position \(99, 0\) is outside",
    ),
    Bad(
        "apop x_other shape",
        lambda: fastxai.apop(_resnet18(), _X, _X[:, :, :16]),
        ValueError,
        r"x_other must have the shape of x_pattern",
    ),
    Bad(
        "activation_matching steps",
        lambda: fastxai.activation_matching(
            _M, _X, steps=0, recipe="paper", progress=False, compile=False
        ),
        ValueError,
        r"steps must be an int >= 1",
    ),
    Bad(
        "activation_matching areas",
        lambda: fastxai.activation_matching(_M, _X, areas=(0.3, 0.1), progress=False),
        ValueError,
        r"areas: expected distinct areas in increasing order",
    ),
    Bad(
        "activation_matching layers",
        lambda: fastxai.activation_matching(_M, _X, layers=["nope"], progress=False),
        ValueError,
        r"layer 'nope' is not a submodule",
    ),
    # inputs that used to fail deep inside torch, or silently
    Bad("x channels", _gc(x=torch.randn(2, 1, 32, 32)), ValueError, r"x has 1 channels"),
    Bad("x float64 for a float32 model", _gc(x=_X.double()), TypeError, r"x is torch\.float64"),
    Bad(
        "compat numpy input",
        lambda: compat.GradCAM(_M, [_M.features])(np.zeros((1, 3, 32, 32), np.float32)),
        TypeError,
        r"input_tensor must be a torch\.Tensor",
    ),
    Bad(
        "stream mixed sizes",
        lambda: list(explain_stream(_M, [_X[0], _X[0, :, :16, :16]], "features", progress=False)),
        ValueError,
        r"data: images of one batch must have one size",
    ),
    Bad(
        "tft logits of another model",
        _tft(logits=torch.randn(2, 10)),
        ValueError,
        r"logits: 10 classes, but the model returns 5",
    ),
    Bad("tft logits batch", _tft(logits=torch.randn(3, 5)), ValueError, r"logits: expected model"),
    Bad(
        "shard folder is a file",
        lambda: explain_dataset(_M, _X, "features", __file__, progress=False),
        NotADirectoryError,
        r"out: .* is a file, expected a folder",
    ),
    Bad("targets numpy float", _gc(targets=np.array([0.5, 1.0])), ValueError, r"targets: expected"),
]
