"""The checkpoint verdict on planted CIs: holds, fails, undecided (CI straddles), not available."""

import numpy as np
import pytest

from gapcache.analyze.checkpoint import FAILS, HOLDS, NOT_AVAILABLE, UNDECIDED, combine, section, verdict
from gapcache.errors import ConfigError


@pytest.mark.parametrize("low, high, threshold, direction, want", [
    (0.06, 0.10, 0.05, ">", HOLDS),        # the whole CI above
    (0.00, 0.04, 0.05, ">", FAILS),        # the whole CI below
    (0.00, 0.05, 0.05, ">", FAILS),        # high on the threshold: no value of the CI is > 0.05
    (0.04, 0.06, 0.05, ">", UNDECIDED),    # straddles
    (0.05, 0.06, 0.05, ">", UNDECIDED),    # low on the threshold: 0.05 itself is not > 0.05
    (0.07, 0.07, 0.05, ">", HOLDS),        # a zero-width CI
    (0.000, 0.009, 0.01, "<", HOLDS),
    (0.010, 0.020, 0.01, "<", FAILS),      # low on the threshold
    (0.005, 0.020, 0.01, "<", UNDECIDED),
    (0.005, 0.010, 0.01, "<", UNDECIDED),  # high on the threshold
    (-0.3, -0.1, 0.0, "<", HOLDS),
    (np.nan, 0.1, 0.05, ">", NOT_AVAILABLE),
    (None, None, 0.05, ">", NOT_AVAILABLE),
])
def test_verdict_on_planted_cis(low, high, threshold, direction, want):
    assert verdict(low, high, threshold, direction) == want


def test_verdict_refuses_a_bad_direction_or_an_inverted_ci():
    with pytest.raises(ConfigError, match=r"'direction' parameter of verdict must be '>' or '<'. Got '>='"):
        verdict(0.0, 1.0, 0.5, ">=")
    with pytest.raises(ConfigError, match=r"must have low <= high. Got \[1.0, 0.0\]"):
        verdict(1.0, 0.0, 0.5, ">")


def test_a_checkpoint_holds_only_when_every_criterion_does():
    assert combine([HOLDS, HOLDS]) == HOLDS
    assert combine([HOLDS, UNDECIDED]) == UNDECIDED
    assert combine([UNDECIDED, FAILS, HOLDS]) == FAILS
    assert combine([HOLDS, NOT_AVAILABLE]) == NOT_AVAILABLE
    assert combine([NOT_AVAILABLE, FAILS]) == FAILS


def test_the_section_lists_each_criterion_with_its_verdict():
    est = {"estimate": 0.2, "low": 0.1, "high": 0.3, "n": 12}
    m = {"cliff_layer": 2, "strategy": "zero", "checkpoints": {"2": {
        "text": "hard deeper", "verdict": HOLDS,
        "criteria": [{"key": "evd_gap", "criterion": "EVD gap hard - easy (layers) > 0", "estimate": est,
                      "verdict": HOLDS, "direction": ">", "threshold": 0.0}]}}}
    html = section({"metrics": {"checkpoint": m}})
    assert "cliff L=2" in html and "EVD gap hard - easy (layers) &gt; 0" in html
    assert "0.200 [0.100, 0.300] (n=12)" in html and "<b>holds</b>" in html
