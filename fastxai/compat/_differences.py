"""One warning per process for each deliberate difference from pytorch-grad-cam.

A user who switches by changing the import learns once where the maps can differ; the list of
differences is in :mod:`fastxai.compat`'s docstring.
"""

from __future__ import annotations

from fastxai._checks import warn_user_once

SVD_SIGN = (
    "fastxai.compat: the principal component's sign is fixed (largest-magnitude value "
    "positive); pytorch-grad-cam keeps the SVD's arbitrary sign, so its map can be the ReLU of "
    "the opposite projection; construct the CAM with svd_sign='numpy' for pytorch-grad-cam's sign"
)
ONE_TARGET_FOR_A_BATCH = (
    "fastxai.compat: one target for a batch of several images explains every image for it; "
    "pytorch-grad-cam explains only the first image and returns zero maps for the others"
)


def warn_once(message: str) -> None:
    warn_user_once(message, message)
