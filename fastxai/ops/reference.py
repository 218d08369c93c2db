"""Pure-PyTorch implementations of every fastxai op: the test oracle and the fallback path."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MINMAX_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image epsilon


def minmax(z: Tensor, eps: float = MINMAX_EPS) -> Tensor:
    r"""Per-map min-max over the last two dims.

    :math:`(z - \min z) / (\max(z - \min z) + \epsilon)`.
    """
    flat = z.flatten(-2)
    shifted = flat - flat.amin(-1, keepdim=True)
    scaled = shifted / (shifted.amax(-1, keepdim=True) + eps)
    return scaled.view_as(z)


def scale_maps(raw: Tensor, height: int, width: int) -> Tensor:
    r"""ReLU, min-max, bilinear upsample (``align_corners=False``) to ``(height, width)``, min-max.

    :math:`M = \mathrm{mm}(\mathrm{up}(\mathrm{mm}(\max(\mathrm{raw}, 0))))` per map, with
    :math:`\mathrm{mm}(z) = (z - \min z) / (\max(z - \min z) + 10^{-7})`: pytorch-grad-cam's
    ``scale_cam_image`` pipeline for one layer. ``raw`` is ``(N, h, w)``; returns ``(N, H, W)``.
    """
    low = minmax(raw.clamp_min(0))
    if raw.shape[0] == 0:
        return raw.new_zeros((0, height, width))
    up = F.interpolate(low[:, None], size=(height, width), mode="bilinear", align_corners=False)[
        :, 0
    ]
    return minmax(up)


def upsample_normalized(raw: Tensor, height: int, width: int) -> Tensor:
    r""":math:`\mathrm{up}(\mathrm{mm}(\max(\mathrm{raw}, 0)))`: one layer's map before the final
    min-max, as pytorch-grad-cam keeps it when it averages several layers."""
    low = minmax(raw.clamp_min(0))
    if raw.shape[0] == 0:
        return raw.new_zeros((0, height, width))
    return F.interpolate(low[:, None], size=(height, width), mode="bilinear", align_corners=False)[
        :, 0
    ]


def fuse_maps(raws: Sequence[Tensor], height: int, width: int, fusion: str = "mean") -> Tensor:
    r"""Several layers' raw maps ``(N, h_l, w_l)`` fused into one ``(N, height, width)`` map.

    ``"mean"`` (pytorch-grad-cam): :math:`\mathrm{mm}(\tfrac1L \sum_l \mathrm{relu}(\mathrm{up}(
    \mathrm{mm}(\mathrm{relu}(r_l)))))`. ``"tanh"`` (Layer-CAM paper, Eq. 9): with
    :math:`M_l = \mathrm{mm}(\mathrm{up}(\mathrm{mm}(\mathrm{relu}(r_l))))` (:func:`scale_maps`),
    :math:`\mathrm{mm}(\max_l \tanh(2 M_l / \max(\max M_l, 10^{-7})))`, the outer maximum
    element-wise. Differentiable; a NaN anywhere in an image's maps makes its fused map NaN.
    """
    if not raws:
        raise ValueError("fuse_maps: raws must hold at least one map")
    if fusion == "mean":
        stacked = torch.stack([upsample_normalized(r, height, width) for r in raws], 1)
        return minmax(stacked.clamp_min(0).mean(1))
    if fusion == "tanh":
        per_layer = [scale_maps(r, height, width) for r in raws]
        peaks = [m.flatten(1).amax(1).clamp_min(MINMAX_EPS)[:, None, None] for m in per_layer]
        scaled = torch.stack([torch.tanh(2 * m / p) for m, p in zip(per_layer, peaks, strict=True)])
        return minmax(scaled.amax(0))
    raise ValueError(f"fusion must be 'mean' or 'tanh', got {fusion!r}")


def layercam(gradient: Tensor, activation: Tensor) -> Tensor:
    r"""Layer-CAM's raw map: :math:`M = \mathrm{ReLU}(\sum_k \mathrm{ReLU}(g_k) \odot A_k)`.

    ``gradient`` :math:`g = \partial y / \partial A` and ``activation`` :math:`A` are
    ``(N, C, h, w)``; returns ``(N, h, w)``.
    """
    return F.relu((F.relu(gradient) * activation).sum(1))


def _mean_absolute(differences: Tensor) -> Tensor:
    """Per-sample mean of ``|differences|`` over (C, H, W); 0 where a sample has no pairs."""
    if math.prod(differences.shape[1:]) == 0:
        return differences.new_zeros(differences.shape[0])
    return differences.abs().mean((1, 2, 3))


def mask_priors(p: Tensor, neighbours: int = 4) -> Tensor:
    r"""Per-sample mask priors ``(N, 3)``: [area, binarisation, total variation] of ``p``.

    ``p`` is ``(N, C, H, W)``, usually ``C = 1``, in [0, 1].

    :math:`\mathrm{area} = \overline{p}`, :math:`\mathrm{bin} = \overline{p (1 - p)}`,
    :math:`\mathrm{tv} = \overline{|p_{i+1,j} - p_{i,j}|} + \overline{|p_{i,j+1} - p_{i,j}|}`, each
    bar a mean over the sample's (C, H, W) terms. ``neighbours=8`` adds both diagonals, each
    direction's mean weighted :math:`1/\sqrt{2}` (the Activation Matching notebook's ``tv8``). A
    direction without pairs (``H`` or ``W`` is 1) contributes 0.
    """
    if neighbours not in (4, 8):
        raise ValueError(f"neighbours must be 4 or 8, got {neighbours!r}")
    dims = (1, 2, 3)
    area = p.mean(dims)
    binarisation = (p * (1 - p)).mean(dims)
    tv = _mean_absolute(p[..., 1:, :] - p[..., :-1, :]) + _mean_absolute(
        p[..., :, 1:] - p[..., :, :-1]
    )
    if neighbours == 8:
        diagonal = _mean_absolute(p[..., 1:, 1:] - p[..., :-1, :-1])
        anti_diagonal = _mean_absolute(p[..., 1:, :-1] - p[..., :-1, 1:])
        tv = tv + (diagonal + anti_diagonal) / math.sqrt(2)
    return torch.stack([area, binarisation, tv], 1)


def stable_rank(maps: Tensor) -> Tensor:
    """Each pixel's position in the stable ascending sort of its map (ties: row-major order).

    ``(N, H, W)`` -> ``(N, H * W)`` int64.
    """
    flat = maps.flatten(1)
    order = torch.sort(flat, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=maps.device).expand_as(order)
    return rank.scatter_(1, order, positions)


def tft_mask(
    maps: Tensor, images: Tensor, thresholds: Tensor, mode: str = "value", mask: str = "binary"
) -> Tensor:
    r"""The masked batch of the TFT ladder from input-resolution maps: ``(N * T, C, H, W)``.

    Row ``n * T + t`` is :math:`w_t(I_n) \odot x_n` with the keep mask :math:`M_t` of threshold
    ``t`` and :math:`w = M_t` (``mask="binary"``) or :math:`w = M_t I_n` (``mask="soft"``):

    * ``mode="value"``: :math:`M_t = [I \ge \tau_t] \wedge [I > 0]`, :math:`\tau_t` in the maps'
      dtype;
    * ``mode="percentile"``: :math:`M_t = [\mathrm{rank}(I) \ge \lfloor q_t H W \rfloor]` with the
      stable rank (ties: the earlier row-major pixel is muted first), :math:`q_t` in float64.

    ``maps`` ``(N, H, W)``, ``images`` ``(N, C, H, W)``, ``thresholds`` ``(T,)``. The weights take
    the images' dtype.
    """
    n, _, height, width = images.shape
    if mode == "value":
        keep = (maps[:, None] >= thresholds.to(maps.dtype)[None, :, None, None]) & (
            maps[:, None] > 0
        )
    elif mode == "percentile":
        muted = torch.floor(thresholds.double() * (height * width)).long()
        keep = (stable_rank(maps)[:, None, :] >= muted[None, :, None]).view(
            n, thresholds.shape[0], height, width
        )
    else:
        raise ValueError(f"mode must be 'value' or 'percentile', got {mode!r}")
    weights = keep.to(images.dtype)
    if mask == "soft":
        weights = weights * maps[:, None].to(images.dtype)
    elif mask != "binary":
        raise ValueError(f"mask must be 'binary' or 'soft', got {mask!r}")
    return (weights[:, :, None] * images[:, None]).flatten(0, 1)


def tft_ladder(
    raw: Tensor, images: Tensor, thresholds: Tensor, mode: str = "value", mask: str = "binary"
) -> tuple[Tensor, Tensor]:
    r"""The masked batch of the TFT ladder from a raw CAM, and the upsampled map.

    :math:`I = \mathrm{scale\_maps}(\mathrm{raw}, H, W)` (ReLU, min-max, bilinear upsample,
    min-max), then :func:`tft_mask` of :math:`I`. ``raw`` ``(N, h, w)``, ``images``
    ``(N, C, H, W)``; returns ``((N * T, C, H, W), (N, H, W))``.
    """
    height, width = images.shape[-2:]
    maps = scale_maps(raw, height, width)
    return tft_mask(maps, images, thresholds, mode, mask), maps


def rpi_select(logits: Tensor, classes: Tensor, original: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Relative probability increase of every ladder row and the selected threshold per image.

    With ``logits`` ``(N * T, K)`` (row ``n * T + t``: image ``n`` masked at threshold ``t``),
    :math:`p_{n,t} = \mathrm{softmax}(\ell_{n,t})_{c_n}` and the original probability
    :math:`p^0_n`: :math:`\mathrm{RPI}_{n,t} = \max(p_{n,t} - p^0_n, 0) / p^0_n` ``(N, T)``, the
    first :math:`\arg\max_t` per image ``(N,)`` int64, or -1 when that maximum is not positive
    (no threshold raised the probability: no muting, Alg. 1 of the TFT paper), and
    :math:`p_{n,t}` ``(N, T)``.
    """
    n = classes.shape[0]
    t = logits.shape[0] // n if n else 0
    probability = torch.softmax(logits, dim=1).gather(1, classes.repeat_interleave(t)[:, None])
    probability = probability.view(n, t)
    rpi = (probability - original[:, None]).clamp_min(0) / original[:, None]
    if t == 0:
        return rpi, classes.new_full((n,), -1), probability
    best = rpi.argmax(1)
    improved = rpi.gather(1, best[:, None])[:, 0] > 0
    return rpi, torch.where(improved, best, torch.full_like(best, -1)), probability
