"""Checks of ``scale_maps`` and ``fuse_maps`` (maps in ``[0, 1]`` after a final min-max).

Tolerance: ``REL`` per element times the final min-max's gain :math:`1 + 1/\\mathrm{range}` of
the reference's map before it (the min-max divides the rounding of the upsampled map by its
range); ``fuse_maps="tanh"`` also multiplies by each layer's gain and by 2, the largest slope
of :math:`\\tanh(2 M / \\max M)` for a layer map whose maximum is about 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fastxai.ops as ops
from fastxai.ops import reference
from fastxai.selftest._core import (
    REL,
    BenchCase,
    Case,
    Inputs,
    LargeCase,
    OpCheck,
    Verdict,
    close,
    combine,
    generator,
    minmax_gain,
    on,
    shape_of,
)

FUSIONS = ("mean", "tanh")
GIB = 1 << 30
# Past 2**31 elements of output: 2049 maps of 1024 x 1024 (the last starts at 2**31).
LARGE_MAPS, LARGE_SIZE = 2049, 1024


def _raw(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=generator(seed))


# ----------------------------------------------------------------------------------------------
# scale_maps


def _scale_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    return (ops.scale_maps(inputs["raw"], inputs["size"], backend=backend),)


def _scale_expected(raw: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    raw64 = raw.detach().cpu().double()
    expected = reference.scale_maps(raw64, height, width)
    gain = minmax_gain(reference.upsample_normalized(raw64, height, width))
    return expected, gain[:, None, None]


def _scale_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    raw = inputs["raw"]
    expected, gain = _scale_expected(raw, *inputs["size"])
    return close("map", outputs[0], expected, REL[raw.dtype] * gain, raw.dtype)


def _scale_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, raw: Tensor, size: tuple[int, int]) -> Case:
        return Case(name, {"raw": raw, "size": size}, f"{shape_of(raw)} -> {size}")

    nan = _raw((3, 5, 6), 3)
    nan[1, 2, 3] = float("nan")
    ties = torch.randint(0, 3, (3, 6, 7), generator=generator(4)).double()
    ties[0] = 0.5  # a constant map: exactly 0 after the min-max
    base = on(device, dtype, _raw((6, 9, 8), 5))
    return [
        case("random up", on(device, dtype, _raw((4, 7, 7), 1)), (64, 64)),
        case("random odd, down", on(device, dtype, _raw((3, 30, 40), 2)), (17, 11)),
        case("N=0", on(device, dtype, _raw((0, 7, 7), 0)), (14, 14)),
        case("NaN in map 1", on(device, dtype, nan), (11, 13)),
        case("ties, a constant map", on(device, dtype, ties), (19, 15)),
        case("non-contiguous transposed", base.transpose(1, 2), (20, 18)),
        case("non-contiguous strided", base[::2, 1::2, ::3], (9, 10)),
        case("non-contiguous expanded", base[:1].expand(3, -1, -1), (12, 12)),
        case("65537 planes", on(device, dtype, _raw((65537, 2, 3), 6)), (3, 4)),
    ]


def _scale_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    return {"raw": inputs["raw"][samples], "size": inputs["size"]}, (outputs[0][samples],)


def _scale_large() -> LargeCase:
    output = LARGE_MAPS * LARGE_SIZE * LARGE_SIZE * 4
    return LargeCase(
        f"({LARGE_MAPS}, 8, 8) -> ({LARGE_SIZE}, {LARGE_SIZE}) float32",
        output + GIB,
        lambda device: {
            "raw": torch.randn(LARGE_MAPS, 8, 8, device=device),
            "size": (LARGE_SIZE, LARGE_SIZE),
        },
        lambda inputs: [0, LARGE_MAPS - 1],
    )


def _scale_bench(device: torch.device) -> BenchCase:
    n = 512 if device.type == "cuda" else 64
    raw = torch.randn(n, 7, 7, device=device)
    return BenchCase(
        f"({n}, 7, 7) -> 224x224", {"raw": raw, "size": (224, 224)}, 4 * n * (49 + 224 * 224)
    )


SCALE_MAPS = OpCheck(
    "scale_maps",
    _scale_run,
    _scale_verify,
    _scale_cases,
    _scale_take,
    _scale_large,
    _scale_bench,
)


# ----------------------------------------------------------------------------------------------
# fuse_maps


def _fuse_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    return tuple(
        ops.fuse_maps(inputs["raws"], inputs["size"], fusion, backend=backend)
        for fusion in inputs.get("fusions", FUSIONS)
    )


def _fuse_gain(raws: list[Tensor], height: int, width: int, fusion: str) -> Tensor:
    """The reference's magnification of rounding (see the module docstring), per image."""
    if fusion == "mean":
        layers = [reference.upsample_normalized(r, height, width).clamp_min(0) for r in raws]
        return minmax_gain(torch.stack(layers).mean(0))
    per_layer = [reference.scale_maps(r, height, width) for r in raws]
    layer_gain = torch.stack(
        [minmax_gain(reference.upsample_normalized(r, height, width)) for r in raws]
    )
    peaks = [m.flatten(1).amax(1).clamp_min(reference.MINMAX_EPS)[:, None, None] for m in per_layer]
    squashed = torch.stack([torch.tanh(2 * m / p) for m, p in zip(per_layer, peaks, strict=True)])
    return minmax_gain(squashed.amax(0)) * layer_gain.amax(0) * 2


def _fuse_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    raws = [r.detach().cpu().double() for r in inputs["raws"]]
    dtype = inputs["raws"][0].dtype
    height, width = inputs["size"]
    verdicts = []
    for fusion, out in zip(inputs.get("fusions", FUSIONS), outputs, strict=True):
        expected = reference.fuse_maps(raws, height, width, fusion)
        gain = _fuse_gain(raws, height, width, fusion)[:, None, None]
        verdicts.append(close(f"{fusion} map", out, expected, REL[dtype] * gain, dtype))
    return combine(verdicts)


def _fuse_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, raws: list[Tensor], size: tuple[int, int]) -> Case:
        moved = [on(device, dtype, r) for r in raws]  # a no-op (the view stays) where they match
        return Case(name, {"raws": moved, "size": size}, f"{shape_of(*moved)} -> {size}")

    def layers(n: int, sizes: list[tuple[int, int]], seed: int) -> list[Tensor]:
        return [_raw((n, h, w), seed + i) for i, (h, w) in enumerate(sizes)]

    nan = layers(3, [(4, 4), (7, 7)], 3)
    nan[1][2, 1, 1] = float("nan")
    nan[0][0, 0, 3] = float("nan")
    ties = [torch.randint(0, 3, (3, 5, 5), generator=generator(4)).double(), _raw((3, 6, 6), 5)]
    ties[0][1] = 2.0  # image 1's first layer is constant
    strided = [on(device, dtype, r) for r in layers(4, [(9, 8), (6, 7)], 6)]
    return [
        case("random 3 layers", layers(2, [(14, 14), (7, 7), (4, 4)], 1), (28, 28)),
        case("random odd, down", layers(3, [(30, 40), (5, 9)], 2), (17, 11)),
        case("N=0", layers(0, [(7, 7), (4, 4)], 0), (14, 14)),
        case("NaN in images 0 and 2", nan, (12, 12)),
        case("ties, a constant layer", ties, (15, 13)),
        case("non-contiguous", [strided[0].transpose(1, 2), strided[1][:, ::2, 1::2]], (16, 18)),
        case("65537 planes", layers(65537, [(2, 2), (3, 2)], 7), (4, 3)),
    ]


def _fuse_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    taken = {**inputs, "raws": [r[samples] for r in inputs["raws"]]}
    return taken, tuple(out[samples] for out in outputs)


def _fuse_large() -> LargeCase:
    output = LARGE_MAPS * LARGE_SIZE * LARGE_SIZE * 4
    return LargeCase(
        f"({LARGE_MAPS}, 7, 7) + ({LARGE_MAPS}, 14, 14) -> ({LARGE_SIZE}, {LARGE_SIZE}) float32",
        output + GIB,
        lambda device: {
            "raws": [
                torch.randn(LARGE_MAPS, 7, 7, device=device),
                torch.randn(LARGE_MAPS, 14, 14, device=device),
            ],
            "size": (LARGE_SIZE, LARGE_SIZE),
            "fusions": ("mean",),
        },
        lambda inputs: [0, LARGE_MAPS - 1],
    )


def _fuse_bench(device: torch.device) -> BenchCase:
    n = 256 if device.type == "cuda" else 32
    raws = [torch.randn(n, s, s, device=device) for s in (56, 28, 14, 7)]
    read = sum(r.numel() for r in raws)
    return BenchCase(
        f"{n} x 4 layers 56..7 -> 224x224 mean",
        {"raws": raws, "size": (224, 224), "fusions": ("mean",)},
        4 * (read + n * 224 * 224),
    )


FUSE_MAPS = OpCheck(
    "fuse_maps",
    _fuse_run,
    _fuse_verify,
    _fuse_cases,
    _fuse_take,
    _fuse_large,
    _fuse_bench,
)
