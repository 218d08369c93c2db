"""Random-CAM: channel weights drawn at random, the baseline a CAM method should beat."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastxai.capture import LayerCapture
from fastxai.methods._base import make_cam_method


def randomcam_contributions(
    cap: LayerCapture, model: nn.Module, x: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r""":math:`w_k \sim \mathcal{U}(-1, 1)` per image and channel, contributions :math:`w_k A_k`.

    The weights are drawn on the CPU (from ``generator``, else the global torch generator), so a
    seed gives the same weights on every device.
    """
    a = cap.activation
    draw = torch.rand(a.shape[:2], generator=generator, dtype=torch.float64)
    weights = (2 * draw - 1).to(device=a.device, dtype=a.dtype)
    return weights[:, :, None, None] * a, weights


randomcam = make_cam_method(
    "randomcam",
    randomcam_contributions,
    with_gradient=False,
    summary=r"""Random-CAM: :math:`M = \mathrm{ReLU}(\sum_k w_k A_k)` with
    :math:`w_k \sim \mathcal{U}(-1, 1)` drawn independently per image and channel (class-agnostic:
    ``targets`` only choose what ``Explanation.targets`` reports), then min-max, bilinear
    upsampling, min-max. ``generator=`` (a CPU :class:`torch.Generator`) makes it repeatable.""",
)
