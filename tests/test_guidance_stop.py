"""`--stop-when` rules: parsing, the quantities against their formulas on a hand-made history, which rule fires."""
import math

import pytest

from geffect_kernels.geffect import GEffectHistory, GEffectResult
from geffect_kernels.guidance import parse_stop_when
from geffect_kernels.guidance.stop import StopRule, fired, quantities


def history(forget, retain):
    h = GEffectHistory("ga")
    for step, (f, r) in enumerate(zip(forget, retain), start=1):
        h.record(step * 3, GEffectResult({"forget": f, "retain": r}, {}))
    return h


def test_parse():
    assert parse_stop_when(None) == () and parse_stop_when("  ") == ()
    assert parse_stop_when("retain_ratio<-0.5, forget_fraction < 0.2,step>40") == (
        StopRule("retain_ratio", True, -0.5), StopRule("forget_fraction", True, 0.2), StopRule("step", False, 40.0))
    assert str(parse_stop_when("forget_fraction<1e-1")[0]) == "forget_fraction<0.1"


@pytest.mark.parametrize("text, message", [("retain_ratio", "cannot read"), ("loss<1", "unknown quantity"),
                                           ("retain_ratio<abc", "cannot read"), ("step<1.2.3", "not a number"),
                                           ("step<nan", "cannot read"), ("retain_ratio<-0.5,", "cannot read")])
def test_parse_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_stop_when(text)


def test_quantities_are_the_running_sums():
    forget, retain = [-4.0, -3.0, -0.6], [-0.5, 0.25, -2.0]
    h = history(forget, retain)
    q = quantities(h, 9)
    assert q["retain_ratio"] == pytest.approx(sum(retain) / abs(sum(forget)), rel=1e-15)
    assert q["forget_fraction"] == pytest.approx(-0.6 / -4.0, rel=1e-15)
    assert q["step"] == 9.0
    empty = quantities(GEffectHistory(), 1)
    assert math.isnan(empty["retain_ratio"]) and math.isnan(empty["forget_fraction"])


def test_which_rule_fires():
    rules = parse_stop_when("retain_ratio<-0.5,forget_fraction<0.2")
    assert fired(rules, history([-4.0], [-1.0]), 1) is None  # ratio -0.25, fraction 1
    assert fired(rules, history([-4.0, -3.0], [-1.0, -3.0]), 2).startswith("retain_ratio<-0.5 (-0.5714")
    assert fired(rules, history([-4.0, -0.5], [1.0, 1.0]), 2).startswith("forget_fraction<0.2 (0.125")
    assert fired((), history([-4.0], [-9.0]), 1) is None
    assert fired(parse_stop_when("step>2"), GEffectHistory(), 3) == "step>2 (3)"
