"""``gradcam(..., tft=True)``: the fused path against the separate-ops path it replaced.

* **fused** (the library): the raw Grad-CAM map goes through one op, ``ops.tft_ladder`` (scale
  and masked ladder batch), then the batch's forward and ``ops.rpi_select``, which also returns
  the class probabilities of the ladder rows.
* **separate ops**: what ``gradcam(tft=True)`` ran before: ``scale_maps`` then ``tft_mask`` (the
  map written and read again), the forward, ``rpi_select``, then the ``(N * T, K)`` softmax over
  the ladder's logits recomputed in Python for the probabilities.

Both run the same capture (forward + gradient at ``layer4`` of a torchvision resnet50 with
random weights, 224 x 224) and the same ladder forward (10 thresholds); the script checks that
they give the same maps, thresholds and probabilities. Times: interleaved rounds, medians,
ratio = median over rounds of ``fused / separate`` (``benchmarks/_timing.py``). Peak memory: the
rise of the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``)
during one call, with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so that freed tensors
leave the resident set (the script re-executes itself with it set).

Run ``python benchmarks/tft_fused_path.py [--repeats R] [--threads 2]`` (Linux only); the rows go
to ``benchmarks/results/tft_fused_path.json`` (``--results``), rendered by ``benchmarks/tables.py``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import re
import sys

import torch
import torchvision
from _results import Results, add_results_option
from _timing import interleave, median_ms, paired_ratio, trusted_count

import fastxai
from fastxai import ops
from fastxai._batching import batched_logits
from fastxai.thresholding import PAPER_THRESHOLDS, selected_masks

MMAP_THRESHOLD = "65536"
LAYER = "layer4"
COLUMNS = [
    ("batch", "batch"),
    ("separate_ms", "separate ops ms", "{:.1f}"),
    ("fused_ms", "fused ms", "{:.1f}"),
    ("ratio", "fused / separate", "{:.3f}x"),
    ("trusted", "trusted"),
    ("peak_separate_mib", "peak rise separate MiB", "{:.1f}"),
    ("peak_fused_mib", "peak rise fused MiB", "{:.1f}"),
]


def separate_ops(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The path before fusion: scale, mask, forward, select, then the softmax again."""
    explained = fastxai.gradcam(model, x, LAYER)
    maps, classes, logits = explained.maps, explained.targets, explained.logits
    ladder = torch.tensor(PAPER_THRESHOLDS, dtype=torch.float64)
    masked = ops.tft_mask(maps, x, ladder)
    ladder_logits = batched_logits(model, masked, None)
    original = torch.softmax(logits.float(), dim=1).gather(1, classes[:, None])[:, 0]
    _, selected, _ = ops.rpi_select(ladder_logits, classes, original)
    t = len(ladder)
    probs = torch.softmax(ladder_logits, dim=1).gather(1, classes.repeat_interleave(t)[:, None])
    best = selected.clamp_min(0)
    improved = selected >= 0
    final = torch.where(
        improved[:, None, None], selected_masks(maps, ladder, best, "value"), maps > 0
    )
    return {
        "maps": maps * final,
        "tau": torch.where(improved, ladder[best], torch.zeros_like(ladder[best])),
        "probabilities": probs.view(-1, t),
    }


def fused(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    tuned = fastxai.gradcam(model, x, LAYER, tft=True)
    return {"maps": tuned.maps, "tau": tuned.tau, "probabilities": tuned.extras["probabilities"]}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M).group(1))


def peak_rise_mib(fn) -> float:
    """The rise of the peak resident set over the resident set before one call of ``fn``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def main() -> int:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8", help="batch sizes")
    add_results_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    print(f"# {ops.extension_status()}", file=sys.stderr)
    results = Results(__file__, args.results)
    results.table("main", COLUMNS)
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.randn(batch, 3, 224, 224)
        want, got = separate_ops(model, x), fused(model, x)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
        contenders = {
            "separate": functools.partial(separate_ops, model, x),
            "fused": functools.partial(fused, model, x),
        }
        memory = {name: [] for name in contenders}
        for _ in range(3):  # alternated, the smallest of three (noise only adds)
            for name, run in contenders.items():
                memory[name].append(peak_rise_mib(run))
        samples = interleave(contenders, args.repeats)
        row = {
            "batch": batch,
            "separate_ms": median_ms(samples["separate"], args.threads),
            "fused_ms": median_ms(samples["fused"], args.threads),
            "ratio": paired_ratio(samples["fused"], samples["separate"], args.threads),
            "trusted": trusted_count(samples["fused"], samples["separate"], args.threads),
            "peak_separate_mib": min(memory["separate"]),
            "peak_fused_mib": min(memory["fused"]),
        }
        results.add("main", row)
        print(row, file=sys.stderr, flush=True)
    results.finish()
    print(results.markdown("main"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
