"""How well a mask's evidence survives other backgrounds: the share of noise and blur backgrounds
``r`` under which :math:`m \\odot x + (1 - m) \\odot r` keeps the class as the top-1."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

# Blur strengths as standard deviations in pixels at 224 (scaled with the image's shorter side).
BLUR_SIGMAS_224 = (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.0, 16.0)


def matched_noise(x: Tensor, copies: int, generators: Sequence[torch.Generator]) -> Tensor:
    """``(N, K, C, H, W)`` Gaussian backgrounds with each image's per-channel mean and standard
    deviation (so their strength follows the model's input normalisation)."""
    mean = x.mean((2, 3), keepdim=True)
    std = x.std((2, 3), keepdim=True)
    draws = torch.stack(
        [
            torch.randn((copies, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype)
            for g in generators
        ]
    )
    return draws * std[:, None] + mean[:, None]


def blurred(x: Tensor, sigma: float) -> Tensor:
    """``x`` under a Gaussian blur of standard deviation ``sigma`` pixels (reflect padding)."""
    from torchvision.transforms.functional import gaussian_blur

    radius = max(1, int(3 * sigma))
    radius = min(radius, (min(x.shape[-2:]) - 1) // 2)
    return gaussian_blur(x, [2 * radius + 1, 2 * radius + 1], [sigma, sigma])


def background_robustness(
    model: nn.Module,
    x: Tensor,
    mask: Tensor,
    labels: Tensor,
    *,
    noise_draws: int = 8,
    blur_sigmas: tuple[float, ...] = BLUR_SIGMAS_224,
    seed: int = 0,
) -> Tensor:
    """``(N,)``: for each image, the share of ``noise_draws`` Gaussian backgrounds (with the
    image's per-channel mean and standard deviation) and ``len(blur_sigmas)`` blurred copies of
    the image under which the masked image's top-1 class is ``labels``. ``mask`` is ``(N, H, W)``
    bool; ``model`` is run under ``torch.no_grad`` in the mode it is in."""
    n = x.shape[0]
    scale = min(x.shape[-2:]) / 224
    generators = [torch.Generator(device=x.device).manual_seed(seed + i) for i in range(n)]
    with torch.no_grad():
        backgrounds = [matched_noise(x, noise_draws, generators)] if noise_draws else []
        if blur_sigmas:
            backgrounds.append(torch.stack([blurred(x, s * scale) for s in blur_sigmas], 1))
        r = torch.cat(backgrounds, 1)  # (N, K, C, H, W)
        m = mask[:, None, None].to(x.dtype)
        composed = m * x[:, None] + (1 - m) * r
        kept = torch.stack([model(c).argmax(1) for c in composed.unbind(1)], 1) == labels[:, None]
    return kept.float().mean(1)
