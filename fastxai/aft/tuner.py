"""The AFT tuner network (Han, Lee and Lee 2022, §4.2.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

TUNER_CHANNELS = 3  # the paper's "three 1x1 convolution filters" of the first layer


class Tuner(nn.Module):
    r"""Two 1x1 convolutions that reduce an activation ``(N, K, h, w)`` to a map ``(N, 1, h, w)``.

    Default (ours; the paper names no nonlinearity):
    :math:`t(A) = \sigma(W_2\,\mathrm{ReLU}(W_1 A + b_1) + b_2)` with
    :math:`W_1 \in \mathbb{R}^{3 \times K}`, :math:`W_2 \in \mathbb{R}^{1 \times 3}` applied at
    every position, so the output lies in (0, 1) like the pooled TFT mask it is fitted to.
    ``linear=True`` is the paper's literal reading, :math:`t(A) = W_2 (W_1 A + b_1) + b_2`, which
    is one K -> 1 linear map of the channels.

    Args:
        in_channels: ``K``, the channels of the activation the tuner reads.
        linear: drop the ReLU and the sigmoid.
    """

    def __init__(self, in_channels: int, *, linear: bool = False) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.linear = linear
        self.reduce = nn.Conv2d(in_channels, TUNER_CHANNELS, kernel_size=1)
        self.project = nn.Conv2d(TUNER_CHANNELS, 1, kernel_size=1)

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        r"""Make the tuner output the constant ``value`` for every input.

        The last 1x1 convolution gets zero weights and the bias :math:`b_2 = \mathrm{logit}(v)
        = \log(v / (1 - v))` (``linear``: :math:`b_2 = v`), with :math:`v` clipped to
        :math:`[10^{-4}, 1 - 10^{-4}]` for the sigmoid. The first layer keeps its weights, so the
        tuner can still learn: the gradient of :math:`W_2` is :math:`\mathrm{ReLU}(W_1 A + b_1)`
        times the residual. Until :math:`W_2` moves, the loss sends no gradient into ``A``.
        """
        if not 0 <= value <= 1 and not self.linear:
            raise ValueError(f"value must lie in [0, 1] for the sigmoid tuner, got {value}")
        self.project.weight.zero_()
        if self.linear:
            self.project.bias.fill_(value)
        else:
            v = min(max(value, 1e-4), 1 - 1e-4)
            self.project.bias.fill_(math.log(v / (1 - v)))

    def forward(self, activation: Tensor) -> Tensor:
        if activation.dim() != 4:
            raise ValueError(
                f"activation must have shape (N, K, h, w), got {tuple(activation.shape)}"
            )
        hidden = self.reduce(activation)
        if self.linear:
            return self.project(hidden)
        return torch.sigmoid(self.project(F.relu(hidden)))


def tuner_loss(tuned: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    r"""The mask term of Eq. 8, averaged over the batch.

    ``tuned`` ``(N, 1, h, w)`` or ``(N, h, w)`` and the pooled TFT mask ``target`` ``(N, h, w)``:
    ``"sum"`` gives :math:`\frac1N\sum_n \sum_{ij} (t_{nij} - m_{nij})^2` (Eq. 8 per image),
    ``"mean"`` the same divided by :math:`hw`.
    """
    if tuned.dim() == 4:
        tuned = tuned[:, 0]
    if tuned.shape != target.shape:
        raise ValueError(
            f"tuner output {tuple(tuned.shape)} and mask target {tuple(target.shape)} differ; "
            "the masks were pooled to another layer's resolution"
        )
    per_image = (tuned - target.to(tuned.dtype)).square().flatten(1).sum(1)
    if reduction == "sum":
        return per_image.mean()
    if reduction == "mean":
        return per_image.mean() / (target.shape[-1] * target.shape[-2])
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
