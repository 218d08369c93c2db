"""Long runs, threads and repeats: no leaks over 1,000 calls, four threads sharing one model get
the sequential maps exactly, and the same inputs give bitwise identical maps on the CPU."""

from __future__ import annotations

import gc
import os
import threading
import warnings

import pytest
import torch
from reliability_cases import ENTRY_POINTS, images, small_net, tensors_of

import fastxai

ENTRY_BY_NAME = {entry.name: entry for entry in ENTRY_POINTS}


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch aliases warns
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def single_thread():
    """Tiny ops gain nothing from threads, and on a busy machine idle OpenMP workers spinning
    for a core make a thousand calls take minutes instead of seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS read from /proc")
def test_thousand_calls_leak_no_tensors_and_little_memory(single_thread):
    model, x = small_net(5), images(2, 32, seed=5)
    calls = [
        lambda: fastxai.gradcam(model, x, "features"),
        lambda: fastxai.gradcam(model, x, "features", [1, 2], tft=True),
        lambda: fastxai.layercam(model, x, ["block", "features"]),
        lambda: fastxai.gradcampp(model, x, "block", lambda out: out[3]),
    ]
    for i in range(40):  # warm up: allocator pools, caches, lazily built splits
        calls[i % len(calls)]()
    tensors_before, rss_before = live_tensors(), rss_bytes()
    for i in range(1000):
        result = calls[i % len(calls)]()
    del result
    tensors_after, rss_after = live_tensors(), rss_bytes()
    assert tensors_after <= tensors_before, (tensors_before, tensors_after)
    assert rss_after < 1.05 * rss_before, (rss_before, rss_after)


THREAD_JOBS = [
    ("gradcam", [0, 1, 2, 3]),
    ("gradcam tft", None),
    ("layercam two layers", [4, 3, 2, 1]),
    ("scorecam", None),
    ("ablationcam", [2, 2, 2, 2]),
    ("compat.GradCAMPlusPlus", None),
    ("nn.Explainer", None),
    ("tft", [1, 0, 1, 0]),
]


def test_four_threads_sharing_one_model_get_the_sequential_maps():
    model = small_net(6)  # fresh: the threads race to build its splits
    inputs = [images(4, 32, seed=100 + i) for i in range(len(THREAD_JOBS))]

    def job(i: int) -> list[torch.Tensor]:
        name, targets = THREAD_JOBS[i]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tensors_of(ENTRY_BY_NAME[name].run(model, inputs[i], targets))

    results: dict[tuple[int, int], list[torch.Tensor]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(w: int) -> None:
        try:
            start.wait()
            for r in range(2):
                for i in range(w, len(THREAD_JOBS), 4):
                    results[i, r] = job(i)
        except BaseException as exc:  # re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(len(THREAD_JOBS)):
        expected = job(i)
        for r in range(2):
            got = results[i, r]
            assert len(got) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), i


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: e.name)
def test_same_inputs_give_bitwise_identical_results(entry):
    model, x = entry.make_model(), images(3, entry.image_size, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = tensors_of(entry.run(model, x, None))
        second = tensors_of(entry.run(model, x.clone(), None))
    assert first, f"{entry.name} returned no tensors"
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_resnet_maps_are_bitwise_identical(tv_model, images):
    model, x = tv_model("resnet18"), images(2, 64)
    for method in ("gradcam", "layercam", "ablationcam"):
        a = fastxai.METHODS[method](model, x, "layer3", [3, 9], tft=method == "gradcam")
        b = fastxai.METHODS[method](model, x, "layer3", [3, 9], tft=method == "gradcam")
        assert torch.equal(a.maps, b.maps) and torch.equal(a.raw, b.raw)
