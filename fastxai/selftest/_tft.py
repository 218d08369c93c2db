"""Checks of the TFT ops: ``tft_ladder`` (and its ``out=`` form), ``tft_mask``, ``rpi_select``.

Tolerances:

* ``tft_ladder``'s map is ``scale_maps``' (``REL`` times the final min-max's gain); given its own
  map, the masked batch must equal the reference's ``tft_mask`` of that map bit for bit (so its
  masks differ from the float64 reference's only where the map is within tolerance of a
  threshold or of the percentile pivot).
* ``tft_mask`` is comparisons and one product per element: bit for bit, against the reference in
  the inputs' dtype (the op compares in the maps' dtype).
* ``rpi_select``: a probability's rounding is relative to itself, so
  :math:`\\mathrm{RPI} = (p - p^0)/p^0` is off by ``REL`` times :math:`p / p^0 = 1 + \\mathrm{RPI}`;
  the index must be the reference's, or one whose reference RPI is within twice that of the
  reference's best (a near tie), and exactly the reference's in a row with NaN.
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
    exact,
    generator,
    minmax_gain,
    on,
    shape_of,
)

GIB = 1 << 30
COMBOS = (("value", "binary"), ("value", "soft"), ("percentile", "binary"), ("percentile", "soft"))
LADDERS = {
    "value": [i / 10 for i in range(10)],
    "percentile": [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0],
}
# Past 2**31 elements of the masked batch: 64 images of 256 x 256, 513 thresholds.
LARGE_IMAGES, LARGE_SIZE, LARGE_T = 64, 256, 513
# Past 2**31 logits: 131073 images x 16 thresholds x 1024 classes (the last image at 2**31).
LARGE_N, LARGE_ROWS_PER_IMAGE, LARGE_K = 131073, 16, 1024


def _randn(shape: tuple[int, ...], seed: int) -> Tensor:
    return torch.randn(shape, dtype=torch.float64, generator=generator(seed))


def _ladders(device: torch.device, ladders: dict[str, list[float]] | None = None) -> dict:
    chosen = LADDERS if ladders is None else ladders
    return {mode: torch.tensor(t, dtype=torch.float64, device=device) for mode, t in chosen.items()}


def _strided_ladders(device: torch.device, dtype: torch.dtype) -> dict:
    """Every other element of a doubled ladder, a strided view in ``dtype`` (float64 or the
    maps' own: a kernel may read thresholds that need no conversion without copying them)."""
    return {
        mode: torch.tensor(t, dtype=dtype, device=device).repeat_interleave(2)[::2]
        for mode, t in LADDERS.items()
    }


def _describe(first: Tensor, images: Tensor, thresholds: dict[str, Tensor]) -> str:
    counts = "/".join(str(t.shape[0]) for t in thresholds.values())
    return f"{shape_of(first, images)} T={counts}"


# ----------------------------------------------------------------------------------------------
# tft_ladder and tft_ladder_out


def _ladder_call(backend: str, inputs: Inputs, with_out: bool) -> tuple[Tensor, ...]:
    raw, images = inputs["raw"], inputs["images"]
    outputs: list[Tensor] = []
    for mode, mask in inputs.get("combos", COMBOS):
        thresholds = inputs["thresholds"][mode]
        out = None
        if with_out:
            rows = images.shape[0] * thresholds.shape[0]
            out = inputs.get("out")
            if out is None:
                out = images.new_full((rows, *images.shape[1:]), float("nan"))
        masked, maps = ops.tft_ladder(
            raw, images, thresholds, mode=mode, mask=mask, out=out, backend=backend
        )
        if with_out and masked is not out:
            raise AssertionError("tft_ladder(out=...) did not return out")
        outputs += [masked, maps]
    return tuple(outputs)


def _ladder_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    raw, images = inputs["raw"], inputs["images"]
    height, width = images.shape[-2:]
    raw64 = raw.detach().cpu().double()
    expected_maps = reference.scale_maps(raw64, height, width)
    gain = minmax_gain(reference.upsample_normalized(raw64, height, width))[:, None, None]
    verdicts = []
    combos = inputs.get("combos", COMBOS)
    for (mode, mask), masked, maps in zip(combos, outputs[::2], outputs[1::2], strict=True):
        what = f"{mode}/{mask}"
        verdict = close(f"{what} map", maps, expected_maps, REL[raw.dtype] * gain, raw.dtype)
        verdicts.append(verdict)
        if not verdict.passed:
            break
        thresholds = inputs["thresholds"][mode].cpu()
        expected = reference.tft_mask(maps.cpu(), images.cpu(), thresholds, mode, mask)
        verdicts.append(exact(f"{what} batch (given its map)", masked, expected))
    return combine(verdicts)


def _ladder_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, raw: Tensor, images: Tensor, thresholds: dict | None = None) -> Case:
        raw, images = on(device, dtype, raw), on(device, dtype, images)
        thresholds = _ladders(device) if thresholds is None else thresholds
        inputs = {"raw": raw, "images": images, "thresholds": thresholds}
        return Case(name, inputs, _describe(raw, images, thresholds))

    nan_raw, nan_images = _randn((3, 5, 6), 3), _randn((3, 2, 9, 11), 4)
    nan_raw[1, 2, 3] = float("nan")
    nan_images[0, 1, 3, 3] = float("nan")
    ties = torch.randint(0, 3, (3, 6, 6), generator=generator(5)).double()
    ties[2] = 1.0  # a constant map: exactly 0
    base_raw = on(device, dtype, _randn((4, 9, 7), 6))
    base_images = on(device, dtype, _randn((4, 3, 15, 12), 7))
    small = _ladders(device, {"value": [0.0, 0.5], "percentile": [0.25, 0.5]})
    return [
        case("random up", _randn((2, 7, 7), 1), _randn((2, 3, 32, 32), 2)),
        case("random odd, down", _randn((3, 30, 40), 8), _randn((3, 2, 17, 13), 9)),
        case("N=0", _randn((0, 7, 7), 0), _randn((0, 3, 8, 8), 0)),
        case("NaN in a map and an image", nan_raw, nan_images),
        case("ties, a constant map", ties, _randn((3, 2, 12, 12), 10)),
        case(
            "non-contiguous",
            base_raw.transpose(1, 2),
            base_images.contiguous(memory_format=torch.channels_last),
            _strided_ladders(device, torch.float64),
        ),
        case("65537 planes", _randn((65537, 2, 2), 11), _randn((65537, 1, 3, 3), 12), small),
    ]


def _ladder_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    n = inputs["images"].shape[0]
    taken = {**inputs, "raw": inputs["raw"][samples], "images": inputs["images"][samples]}
    taken.pop("out", None)
    kept = []
    for masked, maps in zip(outputs[::2], outputs[1::2], strict=True):
        kept += [masked.view(n, -1, *masked.shape[1:])[samples].flatten(0, 1), maps[samples]]
    return taken, tuple(kept)


def _ladder_large(with_out: bool):
    def make() -> LargeCase:
        batch = LARGE_IMAGES * LARGE_T * LARGE_SIZE * LARGE_SIZE * 4
        shape = f"({LARGE_IMAGES}, 7, 7) ({LARGE_IMAGES}, 1, {LARGE_SIZE}, {LARGE_SIZE})"

        def build(device: torch.device) -> Inputs:
            images = torch.randn(LARGE_IMAGES, 1, LARGE_SIZE, LARGE_SIZE, device=device)
            inputs = {
                "raw": torch.randn(LARGE_IMAGES, 7, 7, device=device),
                "images": images,
                "thresholds": {"value": torch.linspace(0, 1, LARGE_T, device=device).double()},
                "combos": (("value", "binary"),),
            }
            if with_out:
                rows = LARGE_IMAGES * LARGE_T
                inputs["out"] = images.new_empty((rows, 1, LARGE_SIZE, LARGE_SIZE))
            return inputs

        needed = (2 if with_out else 1) * batch + GIB
        return LargeCase(
            f"{shape} T={LARGE_T} float32", needed, build, lambda inputs: [0, LARGE_IMAGES - 1]
        )

    return make


def _ladder_bench(with_out: bool):
    def make(device: torch.device) -> BenchCase:
        n, t, c, size = (64 if device.type == "cuda" else 8), 10, 3, 224
        images = torch.randn(n, c, size, size, device=device)
        inputs = {
            "raw": torch.randn(n, 7, 7, device=device),
            "images": images,
            "thresholds": _ladders(device, {"value": LADDERS["value"]}),
            "combos": (("value", "binary"),),
        }
        if with_out:
            inputs["out"] = images.new_empty((n * t, c, size, size))
        pixels = size * size
        moved = 4 * (n * 49 + n * c * pixels + n * t * c * pixels + n * pixels) + 8 * t
        return BenchCase(f"N={n} T={t} C={c} 7x7 -> {size}x{size}", inputs, moved)

    return make


TFT_LADDER = OpCheck(
    "tft_ladder",
    lambda backend, inputs: _ladder_call(backend, inputs, with_out=False),
    _ladder_verify,
    _ladder_cases,
    _ladder_take,
    _ladder_large(with_out=False),
    _ladder_bench(with_out=False),
)
TFT_LADDER_OUT = OpCheck(
    "tft_ladder_out",
    lambda backend, inputs: _ladder_call(backend, inputs, with_out=True),
    _ladder_verify,
    _ladder_cases,
    _ladder_take,
    _ladder_large(with_out=True),
    _ladder_bench(with_out=True),
)


# ----------------------------------------------------------------------------------------------
# tft_mask


def _mask_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    maps, images = inputs["maps"], inputs["images"]
    return tuple(
        ops.tft_mask(
            maps, images, inputs["thresholds"][mode], mode=mode, mask=mask, backend=backend
        )
        for mode, mask in inputs.get("combos", COMBOS)
    )


def _mask_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    maps, images = inputs["maps"].cpu(), inputs["images"].cpu()
    verdicts = []
    for (mode, mask), masked in zip(inputs.get("combos", COMBOS), outputs, strict=True):
        thresholds = inputs["thresholds"][mode].cpu()
        expected = reference.tft_mask(maps, images, thresholds, mode, mask)
        verdicts.append(exact(f"{mode}/{mask} batch", masked, expected))
    return combine(verdicts)


def _mask_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, maps: Tensor, images: Tensor, thresholds: dict | None = None) -> Case:
        maps, images = on(device, dtype, maps), on(device, dtype, images)
        thresholds = _ladders(device) if thresholds is None else thresholds
        inputs = {"maps": maps, "images": images, "thresholds": thresholds}
        return Case(name, inputs, _describe(maps, images, thresholds))

    def rand(shape: tuple[int, ...], seed: int) -> Tensor:
        return torch.rand(shape, dtype=torch.float64, generator=generator(seed))

    nan_maps, nan_images = rand((3, 9, 11), 3), _randn((3, 2, 9, 11), 4)
    nan_maps[0, 3, :4] = float("nan")  # NaN sorts last and is never >= a threshold
    nan_images[1, 0, 2, 2] = float("nan")
    # Quarter steps: map values equal to the value thresholds exactly, and repeated.
    quarters = torch.randint(0, 5, (3, 8, 10), generator=generator(5)).double() / 4
    on_grid = _ladders(device, {"value": [0.0, 0.25, 0.5, 0.75, 1.0], "percentile": [0.3, 0.5]})
    base_maps = on(device, dtype, rand((4, 13, 11), 6))
    base_images = on(device, dtype, _randn((4, 6, 13, 11), 7))
    small = _ladders(device, {"value": [0.0, 0.5], "percentile": [0.25, 0.5]})
    return [
        case("random", rand((2, 32, 32), 1), _randn((2, 3, 32, 32), 2)),
        case("random odd", rand((3, 17, 13), 8), _randn((3, 1, 17, 13), 9)),
        case("N=0", rand((0, 8, 8), 0), _randn((0, 3, 8, 8), 0)),
        case("NaN in a map and an image", nan_maps, nan_images),
        case("ties on the thresholds", quarters, _randn((3, 3, 8, 10), 10), on_grid),
        case(
            "non-contiguous",
            base_maps.transpose(1, 2),
            base_images[:, ::2].transpose(2, 3),
            _strided_ladders(device, dtype),
        ),
        case("65537 planes", rand((65537, 3, 3), 11), _randn((65537, 1, 3, 3), 12), small),
    ]


def _mask_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    n = inputs["images"].shape[0]
    taken = {**inputs, "maps": inputs["maps"][samples], "images": inputs["images"][samples]}
    kept = [out.view(n, -1, *out.shape[1:])[samples].flatten(0, 1) for out in outputs]
    return taken, tuple(kept)


def _mask_large() -> LargeCase:
    shape = (LARGE_IMAGES, 1, LARGE_SIZE, LARGE_SIZE)

    def build(device: torch.device) -> Inputs:
        return {
            "maps": torch.rand(LARGE_IMAGES, LARGE_SIZE, LARGE_SIZE, device=device),
            "images": torch.randn(shape, device=device),
            "thresholds": {"percentile": torch.linspace(0, 1, LARGE_T, device=device).double()},
            "combos": (("percentile", "soft"),),
        }

    batch = LARGE_IMAGES * LARGE_T * LARGE_SIZE * LARGE_SIZE * 4
    return LargeCase(
        f"{shape} T={LARGE_T} float32", batch + GIB, build, lambda i: [0, LARGE_IMAGES - 1]
    )


def _mask_bench(device: torch.device) -> BenchCase:
    n, t, c, size = (64 if device.type == "cuda" else 8), 10, 3, 224
    inputs = {
        "maps": torch.rand(n, size, size, device=device),
        "images": torch.randn(n, c, size, size, device=device),
        "thresholds": _ladders(device, {"value": LADDERS["value"]}),
        "combos": (("value", "binary"),),
    }
    pixels = size * size
    moved = 4 * (n * pixels + n * c * pixels + n * t * c * pixels) + 8 * t
    return BenchCase(f"N={n} T={t} C={c} {size}x{size}", inputs, moved)


TFT_MASK = OpCheck(
    "tft_mask", _mask_run, _mask_verify, _mask_cases, _mask_take, _mask_large, _mask_bench
)


# ----------------------------------------------------------------------------------------------
# rpi_select


def _select_run(backend: str, inputs: Inputs) -> tuple[Tensor, ...]:
    return ops.rpi_select(inputs["logits"], inputs["classes"], inputs["original"], backend=backend)


def _select_verify(inputs: Inputs, outputs: tuple[Tensor, ...]) -> Verdict:
    logits, classes, original = inputs["logits"], inputs["classes"], inputs["original"]
    dtype = logits.dtype
    rpi, index, probability = outputs
    expected_rpi, expected_index, expected_probability = reference.rpi_select(
        logits.detach().cpu().double(), classes.cpu(), original.detach().cpu().double()
    )
    # p is in [0, 1]; the kernels' reassociated softmax sums hold it to the dtype's precision.
    verdict = close("probability", probability, expected_probability, REL[dtype], dtype)
    if not verdict.passed:
        return verdict
    tolerance = REL[dtype] * (1 + expected_rpi.abs())
    verdict = close("rpi", rpi, expected_rpi, tolerance, dtype)
    if not verdict.passed:
        return verdict
    index = index.cpu()
    if index.shape != expected_index.shape or index.dtype != torch.int64:
        return Verdict(False, float("inf"), f"index: {index.dtype} {tuple(index.shape)}")
    t = expected_rpi.shape[1]
    if ((index < -1) | (index >= t)).any():
        return Verdict(False, float("inf"), f"index: {index.tolist()} outside [-1, {t})")
    if expected_index.numel() == 0 or torch.equal(index, expected_index):
        return verdict
    padded = torch.cat([expected_rpi, expected_rpi.new_zeros(expected_rpi.shape[0], 1)], 1)
    chosen = padded.gather(1, torch.where(index < 0, t, index)[:, None])[:, 0]
    best = padded.gather(1, torch.where(expected_index < 0, t, expected_index)[:, None])[:, 0]
    near = (best - chosen).abs() <= 2 * tolerance.amax(1)
    allowed = (index == expected_index) | (near & ~expected_rpi.isnan().any(1))
    if allowed.all():
        return verdict
    n = int((~allowed).nonzero()[0, 0])
    return Verdict(
        False,
        float("inf"),
        f"index of image {n}: {int(index[n])}, reference {int(expected_index[n])} "
        f"(RPI {chosen[n].item():.9g} vs {best[n].item():.9g})",
    )


def _select_cases(device: torch.device, dtype: torch.dtype) -> list[Case]:
    def case(name: str, logits: Tensor, classes: Tensor, original: Tensor) -> Case:
        inputs = {
            "logits": on(device, dtype, logits),
            "classes": classes.to(device),
            "original": on(device, dtype, original),
        }
        return Case(name, inputs, f"{shape_of(logits)} N={classes.shape[0]}")

    def ladder(n: int, t: int, k: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
        g = generator(seed)
        base = torch.randn(n, k, dtype=torch.float64, generator=g)
        classes = torch.randint(0, k, (n,), generator=g)
        original = torch.softmax(base, 1).gather(1, classes[:, None])[:, 0]
        logits = base.repeat_interleave(t, 0) + torch.randn(
            n * t, k, dtype=torch.float64, generator=g
        )
        return logits, classes, original

    nan = ladder(3, 4, 9, 3)
    nan[0][5, 2] = float("nan")  # image 1, threshold 1
    # Every row of an image identical: exact ties in the RPI; image 1 is never raised (-1).
    tie_logits = _randn((3, 7), 4).repeat_interleave(5, 0)
    tie_classes = torch.tensor([0, 3, 6])
    tie_original = torch.tensor([0.01, 1.0, 0.05], dtype=torch.float64)
    wide, wide_classes, wide_original = ladder(4, 6, 33, 5)
    return [
        case("random", *ladder(3, 10, 1000, 1)),
        case("random K=1", *ladder(2, 9, 1, 2)),
        case("N=0", torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0)),
        case("T=0", torch.zeros(0, 5), torch.tensor([1, 2]), torch.tensor([0.2, 0.3])),
        case("NaN in a logit", *nan),
        case("ties, one image never raised", tie_logits, tie_classes, tie_original),
        case(
            "non-contiguous",
            on(device, dtype, wide.t().contiguous()).t(),
            wide_classes.repeat_interleave(2)[::2],
            wide_original.repeat_interleave(2)[1::2],
        ),
        case("65537 planes", *ladder(65537, 1, 3, 6)),
    ]


def _select_take(inputs: Inputs, outputs: tuple[Tensor, ...], samples: list[int]):
    n = inputs["classes"].shape[0]
    logits = inputs["logits"]
    taken = {
        "logits": logits.view(n, -1, logits.shape[1])[samples].flatten(0, 1),
        "classes": inputs["classes"][samples],
        "original": inputs["original"][samples],
    }
    return taken, tuple(output[samples] for output in outputs)


def _select_large() -> LargeCase:
    rows = LARGE_N * LARGE_ROWS_PER_IMAGE

    def build(device: torch.device) -> Inputs:
        return {
            "logits": torch.randn(rows, LARGE_K, device=device),
            "classes": torch.randint(0, LARGE_K, (LARGE_N,), device=device),
            "original": torch.rand(LARGE_N, device=device) * 1e-3 + 1e-4,
        }

    return LargeCase(
        f"({rows}, {LARGE_K}) N={LARGE_N} float32",
        rows * LARGE_K * 4 + GIB,
        build,
        lambda inputs: [0, LARGE_N - 1],
    )


def _select_bench(device: torch.device) -> BenchCase:
    n, t, k = (64 if device.type == "cuda" else 8), 10, 1000
    inputs = {
        "logits": torch.randn(n * t, k, device=device),
        "classes": torch.randint(0, k, (n,), device=device),
        "original": torch.rand(n, device=device) * 1e-3 + 1e-4,
    }
    moved = 4 * n * t * k + 8 * n + 4 * n + 2 * 4 * n * t + 8 * n  # rpi and probability out
    return BenchCase(f"N={n} T={t} K={k}", inputs, moved)


RPI_SELECT = OpCheck(
    "rpi_select",
    _select_run,
    _select_verify,
    _select_cases,
    _select_take,
    _select_large,
    _select_bench,
)
