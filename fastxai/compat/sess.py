"""pytorch-grad-cam's ``SESS`` (Saliency Enhancing with Scaling and Sliding; Tyagi et al., 2022).

The image is resized to several scales and cut into square windows; each window's CAM is
weighted by the window's score for the target (its softmax probability by default, relative to
the best window), pasted back where the window came from, and the pasted maps are fused by a
mean over the windows that cover a pixel (values above ``theta`` only) or a maximum, then
blurred and min-max scaled. Resizing and sliding follow pytorch-grad-cam; its OpenCV resize and
Gaussian blur are computed with torch here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.functional import resize

from fastxai._modes import evaluated
from fastxai.capture import ReshapeTransform
from fastxai.compat._base import BaseCAM, WrappingCAM
from fastxai.compat.cams import GradCAM
from fastxai.compat.utils.image import scale_cam_image
from fastxai.compat.utils.model_targets import ClassifierOutputTarget

Box = tuple[int, int, int, int]  # x, y of the window, width and height of its scaled image


def window_starts(length: int, step_size: int, window_size: int) -> list[int]:
    """Starts of windows ``step_size`` apart along ``length``; the last one is moved back so
    that it ends at the border."""
    starts = []
    for start in range(0, length, step_size):
        if start + window_size >= length:
            starts.append(max(length - window_size, 0))
            break
        starts.append(start)
    return starts


def sliding_window(height: int, width: int, step_size: int, window_size: int) -> list[tuple]:
    """Top-left corners ``(x, y)`` of the windows, row by row."""
    xs = window_starts(width, step_size, window_size)
    return [(x, y) for y in window_starts(height, step_size, window_size) for x in xs]


def _gaussian_blur(image: np.ndarray, size: int = 11, sigma: float = 5.0) -> np.ndarray:
    """``cv2.GaussianBlur(image, (size, size), sigma)``: separable, borders mirrored without
    repeating the edge (OpenCV's default, which also mirrors again past a short side)."""
    x = np.arange(size) - (size - 1) / 2
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.from_numpy(np.float32(kernel / kernel.sum()))
    radius = size // 2
    t = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    for dim in (1, 0):
        n = t.shape[dim]
        index = torch.from_numpy(_mirrored(np.arange(-radius, n + radius), n))
        padded = t.index_select(dim, index).movedim(dim, -1)
        blurred = F.conv1d(padded.reshape(-1, 1, n + 2 * radius), kernel.view(1, 1, -1))
        t = blurred.reshape(*padded.shape[:-1], n).movedim(-1, dim)
    return t.numpy()


def _mirrored(index: np.ndarray, n: int) -> np.ndarray:
    if n == 1:
        return np.zeros_like(index)
    period = 2 * n - 2
    index = np.abs(index) % period
    return np.where(index >= n, period - index, index)


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``cv2.resize`` (bilinear, half-pixel centres, no anti-aliasing) of a float32 map."""
    t = torch.from_numpy(image)[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


class _Fusion:
    """Running mean over the windows covering each pixel (values above ``theta``), or max."""

    def __init__(self, size: tuple[int, int], pool: str, theta: float) -> None:
        self.pool, self.theta = pool, theta
        self.total = np.zeros(size, np.float32)
        self.counts = np.zeros(size, np.float32)

    def add(self, cam: np.ndarray) -> None:
        if self.pool == "max":
            np.maximum(self.total, cam, out=self.total)
            return
        above = cam > self.theta
        self.total[above] += cam[above]
        self.counts += above

    def result(self) -> np.ndarray:
        if self.pool == "max":
            return self.total
        covered = self.counts > 0
        return np.divide(self.total, self.counts, out=np.zeros_like(self.total), where=covered)


class SESS(WrappingCAM):
    """``SESS(model, target_layers, reshape_transform=None, base_method=GradCAM, scales=None,
    num_scales=12, scale_step_ratio=2/7, window_size=None, step_size=None,
    pre_filter_ratio=0.0, theta=0.0, pool="mean", smooth=True, use_softmax_scores=True,
    batch_size=32, **kwargs)(input_tensor, targets=None, eigen_smooth=False)``: float32
    ``(N, H, W)`` in [0, 1], as pytorch-grad-cam's.

    ``scales``: sizes of the image's shorter side (default ``num_scales`` sizes from the window
    size up in steps of ``scale_step_ratio`` times it); ``window_size``: the square window's
    side (default the image's shorter side); ``step_size``: the window stride (default the
    window size); ``pre_filter_ratio``: the share of lowest-scoring windows left out; ``pool``:
    ``"mean"`` or ``"max"``; ``smooth``: an 11 x 11 Gaussian blur (sigma 5) of the fused map;
    ``use_softmax_scores``: weigh windows by the target on the softmax (else on the raw output,
    clipped at 0). ``base_method`` is a :mod:`fastxai.compat` class, constructed with
    ``kwargs``. The model runs in eval mode and gets its own modes back.
    """

    def __init__(
        self,
        model: nn.Module,
        target_layers: Sequence[nn.Module],
        reshape_transform: ReshapeTransform | None = None,
        base_method: type[BaseCAM] = GradCAM,
        scales: Sequence[int] | None = None,
        num_scales: int = 12,
        scale_step_ratio: float = 2.0 / 7.0,
        window_size: int | None = None,
        step_size: int | None = None,
        pre_filter_ratio: float = 0.0,
        theta: float = 0.0,
        pool: str = "mean",
        smooth: bool = True,
        use_softmax_scores: bool = True,
        batch_size: int = 32,
        **kwargs: Any,
    ) -> None:
        if pool not in ("mean", "max"):
            raise ValueError(f"pool must be 'mean' or 'max', got {pool!r}")
        if not 0.0 <= pre_filter_ratio < 1.0:
            raise ValueError(f"pre_filter_ratio must be in [0, 1), got {pre_filter_ratio!r}")
        if num_scales < 1:
            raise ValueError(f"num_scales must be at least 1, got {num_scales!r}")
        for name, value in (("window_size", window_size), ("step_size", step_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.base_cam = base_method(model, target_layers, reshape_transform, **kwargs)
        self.model = model
        self.scales = scales
        self.num_scales = num_scales
        self.scale_step_ratio = scale_step_ratio
        self.window_size = window_size
        self.step_size = step_size
        self.pre_filter_ratio = pre_filter_ratio
        self.theta = theta
        self.pool = pool
        self.smooth = smooth
        self.use_softmax_scores = use_softmax_scores
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.base_cam.device

    def forward(
        self,
        input_tensor: Tensor,
        targets: Sequence[Callable] | None = None,
        eigen_smooth: bool = False,
    ) -> np.ndarray:
        if not isinstance(input_tensor, Tensor) or input_tensor.dim() != 4:
            raise ValueError("input_tensor must be a torch.Tensor (N, C, H, W)")
        x = input_tensor.detach().to(self.device)
        targets = [None] * x.shape[0] if targets is None else list(targets)
        if len(targets) != x.shape[0]:
            raise ValueError(f"targets: expected one per image ({x.shape[0]}), got {len(targets)}")
        with evaluated(self.model):
            cams = [
                self._enhanced(x[i : i + 1], target, eigen_smooth)
                for i, target in enumerate(targets)
            ]
        return scale_cam_image(np.float32(cams))

    def get_scales(self, window_size: int) -> list[int]:
        if self.scales is not None:
            return list(self.scales)
        step = round(window_size * self.scale_step_ratio)
        return [window_size + step * i for i in range(self.num_scales)]

    def collect_patches(
        self, input_tensor: Tensor, window_size: int, step_size: int
    ) -> tuple[list[Tensor], list[Box]]:
        """The windows of every scale and, for each, ``(x, y, scaled width, scaled height)``."""
        patches, boxes = [], []
        for scale in self.get_scales(window_size):
            if scale < window_size:
                raise ValueError(
                    f"scales: each must be at least the window size {window_size}, got {scale}"
                )
            scaled = resize(input_tensor, scale)
            height, width = scaled.shape[-2:]
            for x, y in sliding_window(height, width, step_size, window_size):
                patches.append(scaled[:, :, y : y + window_size, x : x + window_size])
                boxes.append((x, y, width, height))
        return patches, boxes

    def get_target(self, input_tensor: Tensor) -> Callable:
        """The image's top class (as the CAM classes choose it)."""
        with torch.no_grad():
            output = self.model(input_tensor)
        return ClassifierOutputTarget(int(output[0].argmax(-1)))

    def get_scores(self, patches: list[Tensor], target: Callable) -> np.ndarray:
        """Each window's score for ``target``, clipped at 0."""
        scores = []
        with torch.no_grad():
            for start in range(0, len(patches), self.batch_size):
                outputs = self.model(torch.cat(patches[start : start + self.batch_size]))
                if self.use_softmax_scores:
                    outputs = torch.softmax(outputs, dim=-1)
                scores.append(target(outputs).cpu().numpy())
        return np.maximum(np.concatenate(scores), 0)

    def paste_cam(self, cam: np.ndarray, box: Box, target_size: tuple[int, int]) -> np.ndarray:
        """A window's map placed in its scaled image, resized to ``target_size`` (H, W)."""
        x, y, width, height = box
        canvas = np.zeros((height, width), np.float32)
        canvas[y : y + cam.shape[0], x : x + cam.shape[1]] = cam
        return _resized(canvas, *target_size)

    def _enhanced(self, image: Tensor, target: Callable | None, eigen_smooth: bool) -> np.ndarray:
        height, width = image.shape[-2:]
        window = self.window_size if self.window_size is not None else min(height, width)
        step = self.step_size if self.step_size is not None else window
        if target is None:
            target = self.get_target(image)
        patches, boxes = self.collect_patches(image, window, step)
        scores = self.get_scores(patches, target)
        # the same order as pytorch-grad-cam's (NumPy's argsort): it decides which windows the
        # pre-filter drops and the order of the float32 sums
        kept = np.argsort(scores)[int(len(scores) * self.pre_filter_ratio) :]
        best = scores[kept[-1]]
        weights = scores[kept] / best if best > 0 else np.ones(len(kept), np.float32)
        fusion = _Fusion((height, width), self.pool, self.theta)
        for start in range(0, len(kept), self.batch_size):
            chosen = kept[start : start + self.batch_size]
            batch = torch.cat([patches[i] for i in chosen])
            cams = self.base_cam(batch, [target] * len(chosen), eigen_smooth=eigen_smooth)
            for cam, weight, i in zip(
                cams, weights[start : start + len(chosen)], chosen, strict=True
            ):
                fusion.add(self.paste_cam(cam * weight, boxes[i], (height, width)))
        fused = fusion.result()
        return _gaussian_blur(fused) if self.smooth else fused
