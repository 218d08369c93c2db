"""Sizes past the CUDA launch limits: more than 65535 mask planes, more than 16 fused layers.

The CUDA grid's y and z axes stop at 65535 blocks and a kernel argument at a few kilobytes; the
kernels keep large counts on the x axis or hand them to another kernel. GPU only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_GPU

import fastxai.ops as ops
from fastxai.ops import reference

pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


def test_mask_priors_with_more_than_65535_planes_matches_the_reference():
    p = torch.rand(70_000, 1, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = ops.mask_priors(p.cuda(), 8)
    torch.testing.assert_close(got.cpu(), reference.mask_priors(p, 8), atol=1e-12, rtol=0)


def test_fuse_maps_with_17_layers_on_cuda_matches_the_reference():
    generator = torch.Generator().manual_seed(1)
    raws = [torch.randn(2, 3 + i % 4, 5, generator=generator) for i in range(17)]
    for fusion in ("mean", "tanh"):
        got = ops.fuse_maps([r.cuda() for r in raws], (16, 12), fusion)
        expected = reference.fuse_maps(raws, 16, 12, fusion)
        torch.testing.assert_close(got.cpu(), expected, atol=1e-6, rtol=0)
