"""Amortised Activation Matching: the real-time saliency losses against their definitions, the
ladder read off cell scores, and a decoder trained on planted evidence that finds it on held-out
images, for the class asked."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fastxai.matching.amortised import (
    AmortisedExplainer,
    ladder_from_scores,
    rung_mask,
    train_amortised,
)
from fastxai.matching.feature_decoder import decoder_inputs, decoder_logits, init_decoder_params
from fastxai.matching.robustness import blurred
from fastxai.matching.saliency_losses import (
    NOISE_STD,
    SaliencyWeights,
    class_margin,
    random_backgrounds,
    saliency_terms,
    smoothness_loss,
)

SIDE = 32  # fine_cell(32) = 2 px: a 16 x 16 grid of cells


class TextureNet(nn.Module):
    """Class 0 ~ 200 x the mean of ReLU(|checkerboard response| - 0.5), class 1 a constant 1,
    class 2 ~ 3 x the mean brightness. On smooth grey images with one checkerboard square the
    square is class 0's only evidence, and a blurred or noise background holds none."""

    def __init__(self) -> None:
        super().__init__()
        self.texture = nn.Conv2d(3, 1, 2, bias=False)
        self.mix = nn.Conv2d(2, 2, 1)
        self.head = nn.Linear(2, 3)
        with torch.no_grad():
            board = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]) / 4
            self.texture.weight.copy_(board.expand(1, 3, 2, 2) / 3)
            self.mix.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.mix.bias.zero_()
            self.head.weight.zero_()
            self.head.weight[0, 0], self.head.weight[2, 1] = 200.0, 3.0
            self.head.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        texture = torch.relu(self.texture(x).abs() - 0.5)
        brightness = torch.relu(x.mean(1, keepdim=True))[..., 1:, 1:]
        h = self.mix(torch.cat([texture, brightness], 1))
        return self.head(h.mean((2, 3)))


def textured_squares(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Smooth grey images with an 8 x 8 checkerboard (amplitude 1) at a random even position;
    and the squares."""
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        0.3 * torch.randn(n, 1, SIDE // 4, SIDE // 4, generator=g),
        size=(SIDE, SIDE),
        mode="bilinear",
        align_corners=False,
    )
    x = base.expand(n, 3, SIDE, SIDE).clone() + 0.02 * torch.randn(n, 3, SIDE, SIDE, generator=g)
    board = (torch.arange(SIDE)[:, None] + torch.arange(SIDE)[None, :]) % 2 * 2.0 - 1.0
    square = torch.zeros(n, SIDE, SIDE, dtype=torch.bool)
    for i in range(n):
        top, left = (2 * int(v) for v in torch.randint(0, (SIDE - 8) // 2 + 1, (2,), generator=g))
        square[i, top : top + 8, left : left + 8] = True
    x += (board * square)[:, None]
    return x, square


LAYERS = ["texture", "mix"]
AREAS = (0.03, 0.0625, 0.125, 0.25)


def test_losses_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, 5.0, -1.0], [0.5, 0.25, 3.0]])
    labels = torch.tensor([1, 0])
    torch.testing.assert_close(class_margin(logits, labels), torch.tensor([3.0, -2.5]))
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 1] = 1.0  # one kept pixel in the middle: 4 unit differences, no border
    torch.testing.assert_close(smoothness_loss(mask, 0.3), torch.tensor([2.0]))
    corner = torch.zeros(1, 1, 3, 3)
    corner[0, 0, 0, 0] = 1.0  # 2 differences, and on two borders: (2 + 0.3 * 2) / 2
    torch.testing.assert_close(smoothness_loss(corner, 0.3), torch.tensor([1.3]))
    half = torch.full((1, 1, 8, 8), 0.5)
    w = SaliencyWeights()
    terms = saliency_terms(half, logits[:1], logits[1:], torch.tensor([1]), w)
    # smoothness at a quarter of the size: 2 x 2 values 0.5, 8 border entries of 0.25, no
    # differences; preserver: class 1 wins by 3 > confidence 1, so it is clamped at -1;
    # destroyer: class 1 loses by 2.75 in the destroyed image (clamp at -5 not reached)
    expected = [w.smoothness * w.border * 8 * 0.25 / 2, -0.3, -2.75]
    torch.testing.assert_close(terms[0], torch.tensor(expected))


def test_rung_masks_keep_the_area_asked_of_the_best_scored_cells() -> None:
    scores = torch.randn(3, 1, 10, 10, generator=torch.Generator().manual_seed(0))
    areas = torch.tensor([0.05, 0.2, 0.5])
    sharp = rung_mask(scores, areas, 1e-4)
    for i in range(3):  # the top area x 100 cells, and only those
        k = round(float(areas[i]) * 100)
        best = scores[i].flatten() >= scores[i].flatten().topk(k).values[-1]
        assert torch.equal(sharp[i].flatten() > 0.5, best)
    assert float((sharp - sharp.round()).abs().max()) < 1e-3
    torch.testing.assert_close(
        rung_mask(7.0 * scores + 3.0, areas, 0.3), rung_mask(scores, areas, 0.3)
    )
    soft = rung_mask(scores.requires_grad_(), areas, 0.3)
    (soft * torch.randn_like(soft)).sum().backward()
    assert scores.grad is not None and float(scores.grad.abs().sum()) > 0


def test_backgrounds_are_the_blurred_image_or_scaled_noise() -> None:
    x = torch.randn(16, 3, 64, 64)
    mean, scale = torch.full((1, 3, 1, 1), 0.2), torch.full((1, 3, 1, 1), 2.0)
    noisy, background = random_backgrounds(x, mean, scale, torch.Generator().manual_seed(0))
    assert 0.0 < float((noisy - x).std()) < 0.2  # faint noise on the kept pixels
    blur = blurred(x, 11.0 * 64 / 224)
    is_blur = [torch.equal(background[i], blur[i]) for i in range(16)]
    assert 2 <= sum(is_blur) <= 14  # each with probability 1/2
    for i in range(16):
        if not is_blur[i]:  # one colour per channel plus noise of 0.22 x scale
            spread = background[i].std((1, 2))
            torch.testing.assert_close(spread, torch.full((3,), NOISE_STD * 2.0), rtol=0.05, atol=0)


def test_ladder_keeps_the_best_scored_cells_within_each_area() -> None:
    scores = torch.arange(256.0).view(1, 16, 16)  # 32 x 32 images: 16 x 16 cells of 2 px
    result = ladder_from_scores(scores, (32, 32), torch.tensor([0.125, 0.25, 0.5]))
    assert result.kept[:, 0].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.125])
    smallest = result.masks[-1][0]  # 32 cells: the best, 224..255, are the last two grid rows
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[28:32] = True
    assert torch.equal(smallest, expected)
    masks = result.masks  # nested: each rung inside the one before
    assert all((a <= b).all() for a, b in zip(masks[1:], masks[:-1], strict=True))
    # partial edge cells: 31 x 31 images, the last row and column of cells 1 px wide
    odd = ladder_from_scores(torch.zeros(1, 16, 16), (31, 31), torch.tensor([0.1]))
    assert 0.09 < float(odd.kept[-1]) <= 0.1
    with pytest.raises(ValueError, match="scores"):
        ladder_from_scores(torch.zeros(1, 4, 4), (32, 32), torch.tensor([0.1]))


def test_decoder_reads_each_image_alone_and_the_evidence_map() -> None:
    features = [torch.randn(3, 4, 8, 8), torch.randn(3, 6, 2, 2)]
    x, evidence = torch.randn(3, 3, 16, 16), torch.rand(3, 16, 16)
    params = init_decoder_params([4, 6], width=5, seed=1)
    inputs = decoder_inputs(features, x, evidence, (4, 4))
    logits = decoder_logits(params, inputs)
    assert logits.shape == (3, 1, 4, 4)
    scaled = [features[0] * torch.tensor([1.0, 7.0, 0.1]).view(3, 1, 1, 1), features[1]]
    torch.testing.assert_close(
        decoder_logits(params, decoder_inputs(scaled, x, evidence, (4, 4))), logits
    )  # each layer is divided by its per-image RMS
    for i in range(3):
        alone = decoder_inputs(
            [f[i : i + 1] for f in features], x[i : i + 1], evidence[i : i + 1], (4, 4)
        )
        torch.testing.assert_close(decoder_logits(params, alone), logits[i : i + 1])
    flipped = decoder_inputs(features, x, evidence.flip(1), (4, 4))
    assert not torch.allclose(decoder_logits(params, flipped), logits)


@pytest.fixture(scope="module")
def trained() -> AmortisedExplainer:
    model = TextureNet().eval()
    x, _ = textured_squares(24, seed=0)
    options = dict(steps=150, batch_size=8, lr=1e-2, width=8, top_classes=2, progress=False)
    return train_amortised(model, x, layers=LAYERS, **options)


def test_trained_decoder_finds_held_out_evidence_for_the_class_asked(trained) -> None:
    model = trained.model
    params_before = {n: p.clone() for n, p in model.named_parameters()}
    history = trained.history.sum(1)
    assert history[-15:].mean() < history[:15].mean() - 1.0
    x, square = textured_squares(6, seed=1)  # squares at new positions
    assert (model(x).argmax(1) == 0).all()
    ex = trained.explain(x, areas=AREAS)
    assert ex.extras["recipe"] == "amortised" and ex.extras["found"].all()
    inside = (ex.mask & square).sum((1, 2)) / ex.mask.sum((1, 2))
    assert (inside >= 0.9).all(), inside
    torch.testing.assert_close(ex.extras["explanation"], ex.mask[:, None] * x)
    p_x = model(x).softmax(1)[:, 0]
    p_e = model(ex.mask[:, None] * x).softmax(1)[:, 0]
    torch.testing.assert_close(ex.extras["prob_e"], p_e, rtol=1e-5, atol=1e-6)
    assert (p_e >= 0.5 * p_x).all()
    ladder = ex.extras["ladder"]
    first = ladder["keeps_class"].int().argmax(1)
    torch.testing.assert_close(ex.extras["area"], ladder["areas"][first])
    assert (ladder["kept_fraction"] <= ladder["areas"][None] + 1e-6).all()
    # the class is an input: class 2 (brightness) has other evidence, so its cells differ
    with pytest.warns(UserWarning, match="keeps class 2"):  # brightness is everywhere
        other = trained.explain(x, targets=2, areas=AREAS)
    assert not torch.equal(other.extras["cell_logits"], ex.extras["cell_logits"])
    assert (other.targets == 2).all()
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]) and p.grad is None and p.requires_grad
    assert not model.training


def test_training_is_determined_by_the_seed() -> None:
    model, (x, _) = TextureNet().eval(), textured_squares(8, seed=0)
    options = dict(layers=LAYERS, steps=5, batch_size=4, width=4, progress=False)
    a, b = train_amortised(model, x, **options), train_amortised(model, x, **options)
    c = train_amortised(model, x, seed=1, **options)
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], rtol=0, atol=0)
    assert any(not torch.equal(a.params[n], c.params[n]) for n in a.params)


def test_explainer_saves_loads_and_checks_the_model(tmp_path, trained) -> None:
    path = tmp_path / "decoder.pt"
    trained.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["decoder.pt"]  # no temporary file left
    loaded = AmortisedExplainer.load(path, trained.model)
    assert loaded.layers == trained.layers and loaded.weights == trained.weights
    x, _ = textured_squares(2, seed=3)
    assert torch.equal(loaded.explain(x, areas=AREAS).mask, trained.explain(x, areas=AREAS).mask)
    with pytest.raises(ValueError, match="'texture' is not a submodule"):
        AmortisedExplainer.load(path, nn.Sequential(nn.Conv2d(3, 1, 2)))
    torch.save({"format": 1}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="is not a saved AmortisedExplainer"):
        AmortisedExplainer.load(tmp_path / "old.pt", trained.model)
    wider = TextureNet().eval()
    wider.mix = nn.Conv2d(2, 5, 1)
    wider.head = nn.Linear(5, 3)
    with pytest.raises(ValueError, match="'mix' gives 5 channels, the decoder was trained on 2"):
        AmortisedExplainer.load(path, wider).explain(x)


def test_bad_options_name_the_argument(trained) -> None:
    model, (x, _) = TextureNet().eval(), textured_squares(2, seed=0)
    for options, message in [
        (dict(steps=0), "steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(lr=0.0), "lr"),
        (dict(top_classes=0), "top_classes"),
        (dict(top1_share=1.5), "top1_share"),
        (dict(width=0), "width"),
        (dict(temperature=0.0), "temperature"),
        (dict(areas=(0.3, 0.1)), "areas"),
    ]:
        with pytest.raises(ValueError, match=message):
            train_amortised(model, x, layers=LAYERS, progress=False, **options)
    with pytest.raises(ValueError, match="areas"):
        trained.explain(x, areas=(0.2, 0.1))
    with pytest.raises(ValueError, match="background"):
        trained.explain(x, background="noise")
    with pytest.raises(ValueError, match="rank_by"):
        trained.explain(x, rank_by="random")
    with pytest.raises(ValueError, match="x: expected at least one image"):
        trained.explain(x[:0])
