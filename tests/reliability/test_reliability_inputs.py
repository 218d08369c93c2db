"""Malformed inputs get the documented error naming the argument; random well- and ill-formed
calls (hypothesis) raise nothing but documented errors and otherwise return valid maps."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from reliability_cases import BAD_INPUTS, NUM_CLASSES, Bad, small_net

import fastxai


def test_table_covers_the_issue_categories():
    assert len(BAD_INPUTS) >= 25
    assert len({bad.id for bad in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: b.id)
def test_malformed_input_gets_documented_error(bad: Bad):
    with warnings.catch_warnings(), pytest.raises(bad.error, match=bad.match) as info:
        warnings.simplefilter("ignore")
        bad.call()
    assert type(info.value) is bad.error or issubclass(type(info.value), bad.error)


MODEL = small_net(11)
DOCUMENTED = (ValueError, TypeError)
# What a documented error's message starts with or contains: the argument it is about.
ARGUMENT_NAMES = re.compile(r"\b(x|layer|targets|thresholds|maps|mode|mask|batch_size)\b")

targets_strategy = st.one_of(
    st.none(),
    st.integers(-2, NUM_CLASSES + 1),
    st.lists(st.integers(-1, NUM_CLASSES), min_size=0, max_size=4),
    st.lists(st.integers(0, NUM_CLASSES - 1), min_size=0, max_size=4).map(torch.tensor),
)
thresholds_strategy = st.one_of(
    st.none(),
    st.lists(
        st.one_of(st.floats(-0.5, 1.5), st.sampled_from([float("nan"), float("inf")])),
        min_size=0,
        max_size=5,
    ),
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI must not flake)
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(sorted(fastxai.METHODS)),
    n=st.integers(0, 3),
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    channels=st.sampled_from([3, 3, 3, 1]),
    targets=targets_strategy,
    tft=st.booleans(),
    thresholds=thresholds_strategy,
    mode=st.sampled_from(["value", "percentile", "other"]),
)
def test_random_calls_raise_only_documented_errors(
    method, n, height, width, channels, targets, tft, thresholds, mode
):
    x = torch.randn(n, channels, height, width, generator=torch.Generator().manual_seed(n))
    options = {"thresholds": thresholds, "mode": mode} if tft else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fastxai.METHODS[method](
                MODEL, x, "features", targets, tft=tft, tft_options=options
            )
    except DOCUMENTED as exc:
        event(f"documented {type(exc).__name__}")
        assert ARGUMENT_NAMES.search(str(exc)), f"message does not name the argument: {exc}"
        return
    except RuntimeError as exc:
        event("model refused the input")
        # The model itself refuses inputs it cannot take (a 1-channel image, an image smaller
        # than its kernels): PyTorch's own error, from the model's forward, passed through.
        assert channels == 1 or min(height, width) < 3, exc
        return
    event("explained")
    assert result.maps.shape == (n, height, width)
    assert result.maps.dtype == torch.float32
    assert bool(torch.isfinite(result.maps).all())
    if n:
        assert float(result.maps.min()) >= 0 and float(result.maps.max()) <= 1
    assert result.targets.shape == (n,)
    if tft and n:
        assert result.tau is not None and result.mask.shape == (n, height, width)
