"""SRD's fast form against an explicit per-tap reference (the paper's Eq. 3-5 written out per part).

The reference mirrors the official code term by term: one full convolution per kernel tap (and
per max-pool window offset) with the weight masked to that tap, the shift split over the parts in
proportion to their norms, the sharing ratio against the pre-activation, and an index scatter to
``p = stride * q + dilation * k - padding``. It is slow by design and lives only here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fastxai.decomposition import fast
from fastxai.decomposition.explain import decompose
from fastxai.decomposition.trace import LinearSource, PoolRouting, Unit

EPS = 1e-12
TOLERANCE = 1e-4


def _offset_masks(pool: PoolRouting) -> list[tuple[tuple[int, int], Tensor]]:
    """(window offset, mask of pooled elements whose arg-max sits at that offset)."""
    width = pool.input_size[1]
    hu, wu = pool.pooled.shape[-2:]
    rows, cols = pool.indices // width, pool.indices % width
    start_r = torch.arange(hu)[:, None] * pool.stride[0] - pool.padding[0]
    start_c = torch.arange(wu)[None, :] * pool.stride[1] - pool.padding[1]
    out = []
    for a in range(pool.kernel_size[0]):
        for b in range(pool.kernel_size[1]):
            offset = (a * pool.dilation[0], b * pool.dilation[1])
            mask = (rows - start_r == offset[0]) & (cols - start_c == offset[1])
            out.append((offset, mask))
    return out


def _parts(source: LinearSource, out_size: tuple[int, int]):
    """Yield ``(c0, rows, cols)``: one raw contribution ``(N, C_out, Ho, Wo)`` per part and the
    slot position ``(Ho, Wo)`` each output position's part comes from."""
    ho, wo = out_size
    qr, qc = torch.arange(ho)[:, None].expand(ho, wo), torch.arange(wo)[None, :].expand(ho, wo)
    pool = source.pool
    if pool is None:
        maps = [((0, 0), source.inputs)]
    else:
        maps = [(offset, pool.pooled * mask) for offset, mask in _offset_masks(pool)]
    for offset, m in maps:
        if source.weight is None:
            taps = [((0, 0), m)]
        else:
            kh, kw = source.weight.shape[-2:]
            taps = []
            for i in range(kh):
                for j in range(kw):
                    masked = torch.zeros_like(source.weight)
                    masked[:, :, i, j] = source.weight[:, :, i, j]
                    c0 = F.conv2d(
                        m,
                        masked,
                        None,
                        source.stride,
                        source.padding,
                        source.dilation,
                        source.groups,
                    )
                    taps.append(((i, j), c0))
        for (i, j), c0 in taps:
            if source.weight is None:
                ur, uc = qr, qc
            else:
                ur = source.stride[0] * qr + source.dilation[0] * i - source.padding[0]
                uc = source.stride[1] * qc + source.dilation[1] * j - source.padding[1]
            if pool is None:
                yield c0, ur, uc
                continue
            hu, wu = pool.pooled.shape[-2:]
            inside = (ur >= 0) & (ur < hu) & (uc >= 0) & (uc < wu)
            rr = torch.where(inside, pool.stride[0] * ur + offset[0] - pool.padding[0], -1)
            cc = torch.where(inside, pool.stride[1] * uc + offset[1] - pool.padding[1], -1)
            yield c0, rr, cc


def reference_unit_backward(
    unit: Unit, relevance: Tensor, residuals: list[float] | None = None
) -> list[tuple[str, Tensor]]:
    """Explicit per-part SRD backward of one unit (the paper's Eqs. written out)."""
    vhat = unit.preact
    n, _, ho, wo = vhat.shape
    norm2 = vhat.square().sum(1)
    total_contribution = torch.zeros_like(vhat)
    out = []
    for source in unit.sources:
        parts = list(_parts(source, (ho, wo)))
        norms = [c0.norm(dim=1) for c0, _, _ in parts]
        total = torch.stack(norms).sum(0)
        if source.pool is not None:
            height, width = source.pool.input_size
        else:
            height, width = source.inputs.shape[-2:]
        r_in = vhat.new_zeros(n, height * width)
        for (c0, rows, cols), norm in zip(parts, norms, strict=True):
            c = c0
            if source.shift is not None:
                share = torch.where(total > 0, norm / (total + EPS), torch.zeros_like(norm))
                c = c0 + source.shift[None, :, None, None] * share[:, None]
            total_contribution += c
            mu = (c * vhat).sum(1) / (norm2 + EPS) * (norm2 > 0)
            valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
            flat = torch.where(valid, rows * width + cols, 0).flatten()
            values = (mu * relevance * valid).reshape(n, -1)
            r_in.scatter_add_(1, flat.expand(n, -1), values)
        out.append((source.slot, r_in.view(n, height, width)))
    if residuals is not None:
        scale = vhat.abs().max().clamp_min(1e-30)
        residuals.append(float((total_contribution - vhat).abs().max() / scale))
    return out


def _relative_gap(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


CASES = [
    ("resnet18", "contrastive", "gradcam", 48),
    ("resnet50", "contrastive", "gradcam", 48),
    ("resnet50", "identity", "gradcam", 32),
    ("vgg16", "contrastive", "gradcam", 64),
    ("vgg16", "identity", "pure_srd", 32),
    ("vgg16_bn", "contrastive", "gradcam", 64),
    ("vgg16_bn", "identity", "pure_srd", 32),
]


@pytest.mark.parametrize(("name", "rule", "vgg_head", "size"), CASES)
def test_fast_form_equals_explicit_per_tap_reference(tv_model, images, name, rule, vgg_head, size):
    model = tv_model(name)
    x = images(2, size)
    with torch.no_grad():
        _, classes, fast_relevance, _ = decompose(model, x, None, rule, vgg_head)
        _, ref_classes, ref_relevance, _ = decompose(
            model, x, None, rule, vgg_head, reference_unit_backward
        )
    assert torch.equal(classes, ref_classes)
    assert fast_relevance.keys() == ref_relevance.keys()
    worst = max(_relative_gap(fast_relevance[s], ref_relevance[s]) for s in ref_relevance)
    assert worst <= TOLERANCE, f"{name}: worst max|diff|/max|R| over the units {worst:.2e}"
    assert _relative_gap(fast_relevance["input"], ref_relevance["input"]) <= TOLERANCE
    assert float(ref_relevance["input"].abs().max()) > 0


@pytest.mark.parametrize(("name", "size"), [("resnet18", 48), ("vgg16_bn", 32)])
def test_reference_contributions_sum_to_the_preactivation(tv_model, images, name, size):
    residuals: list[float] = []

    def backward(unit: Unit, relevance: Tensor) -> list[tuple[str, Tensor]]:
        return reference_unit_backward(unit, relevance, residuals)

    with torch.no_grad():
        decompose(tv_model(name), images(1, size), None, "identity", "pure_srd", backward)
    assert len(residuals) > 5
    assert max(residuals) < 1e-5


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "groups", "c_in", "c_out", "pooled"),
    [
        (3, 2, 2, 2, 2, 4, 6, True),  # strided, dilated, grouped, max-pool merged
        (3, 1, 2, 2, 1, 4, 6, True),  # stride 1 (all-position norms), quadratic form
        (3, 2, 1, 1, 1, 6, 4, False),  # strided, direct norms
        (3, 1, 1, 1, 2, 4, 4, False),  # grouped, stride 1
        (1, 2, 0, 1, 1, 4, 6, True),  # 1x1 stride 2 after a pool (ResNet downsample)
    ],
)
def test_fast_and_reference_agree_on_one_unit(
    kernel, stride, padding, dilation, groups, c_in, c_out, pooled
):
    g = torch.Generator().manual_seed(3)
    v = torch.rand(2, c_in, 11, 11, generator=g)
    pool = None
    inputs = v
    if pooled:
        inputs, indices = F.max_pool2d(v, 3, 2, 1, 1, return_indices=True)
        pool = PoolRouting(inputs, indices, (11, 11), (3, 3), (2, 2), (1, 1), (1, 1))
    weight = torch.randn(c_out, c_in // groups, kernel, kernel, generator=g)
    shift = torch.randn(c_out, generator=g)
    geometry = ((stride, stride), (padding, padding), (dilation, dilation))
    source = LinearSource("in", inputs, weight, shift, *geometry, groups, pool)
    preact = F.conv2d(inputs, weight, shift, stride, padding, dilation, groups)
    unit = Unit("out", preact, [source])
    relevance = torch.randn(preact.shape[0], *preact.shape[-2:], generator=g)
    ((slot, fast_r),) = fast.unit_backward(unit, relevance)
    ((_, ref_r),) = reference_unit_backward(unit, relevance)
    assert slot == "in" and fast_r.shape == (2, 11, 11)
    assert _relative_gap(fast_r, ref_r) <= TOLERANCE
    assert torch.allclose(fast_r.sum((1, 2)), relevance.sum((1, 2)), rtol=1e-4, atol=1e-4)
