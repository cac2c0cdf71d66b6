"""The paper's observations (a)-(f) on constructed numbers: each holds where built to, fails where built not to."""
import pytest

from geffect_kernels.eval.observations import (ga_retaining_negative, npo_spares_damaging_instances,
                                               npo_weights_shrink, retain_at_forget_level,
                                               shallow_layers_dominate, token_weighted_damage_less, verdict,
                                               guidance_damage_less)


def test_a_ga_retaining_effect_sign():
    assert ga_retaining_negative([-0.2, 0.05, -0.1]).holds
    check = ga_retaining_negative([-0.2, 0.3])
    assert not check.holds and "0.1" in check.evidence and "negative at 1 of them" in check.evidence


def test_b_c_shallow_half_against_deep_half():
    shallow = {"ga": [[-3, 2], [1, -1], [0.1, 0.2], [0.3, -0.1]], "npo": [[-1], [-1], [0.5], [0.2]]}
    assert shallow_layers_dominate(shallow, "forget").holds
    # one objective whose deep half is larger sinks the observation
    mixed = {**shallow, "wga": [[0.1], [0.1], [-2], [0.1]]}
    assert not shallow_layers_dominate(mixed, "forget").holds
    # odd block count: the middle block counts for neither half (a huge middle value changes nothing)
    odd = {"ga": [[2], [100], [1]]}
    assert shallow_layers_dominate(odd, "retain").holds
    assert not shallow_layers_dominate({"ga": [[1], [100], [2]]}, "retain").holds
    with pytest.raises(ValueError, match="two blocks"):
        shallow_layers_dominate({"ga": [[1]]}, "forget")


def test_d_npo_weights_shrink():
    assert npo_weights_shrink([0, 2, 4, 6], [1.0, 0.8, 0.5, 0.3]).holds
    assert not npo_weights_shrink([0, 2, 4, 6], [1.0, 1.1, 1.2, 1.3]).holds
    # ends lower but rises on the way: the rank correlation with the step is positive
    assert not npo_weights_shrink([0, 2, 4, 6, 8, 10], [0.9, 1.0, 1.1, 1.2, 1.3, 0.85]).holds
    with pytest.raises(ValueError, match="two probes"):
        npo_weights_shrink([0], [1.0])


def test_e_damaging_instances_get_smaller_weights():
    constant = ([1.0, 1.0, 1.0], [0.1, 0.5, 0.2])  # the reference: equal weights rank nothing, skipped
    spared = ([0.9, 0.2, 0.6], [0.1, 0.9, 0.4])  # most damaging instance (0.9) has the smallest weight
    favoured = ([0.2, 0.9, 0.6], [0.1, 0.9, 0.4])
    check = npo_spares_damaging_instances([constant, spared])
    assert check.holds and "over 1 probes" in check.evidence
    assert not npo_spares_damaging_instances([constant, favoured]).holds
    assert not npo_spares_damaging_instances([spared, favoured, favoured]).holds
    with pytest.raises(ValueError, match="differ"):
        npo_spares_damaging_instances([constant])


def _trajectories(retain_at_end):
    """Every objective goes from forget 0.9 / retain 0.9 at step 0 to forget 0.1 at step 2."""
    rows = []
    for name, retain in retain_at_end.items():
        rows += [{"objective": name, "step": 0, "probe_forget_probability": 0.9, "probe_retain_probability": 0.9},
                 {"objective": name, "step": 2, "probe_forget_probability": 0.1,
                  "probe_retain_probability": retain}]
    return rows


def test_f_token_weighted_objectives_against_ga_and_npo():
    good = _trajectories({"ga": 0.5, "npo": 0.6, "wga": 0.8, "tnpo": 0.7, "wtnpo": 0.85})
    assert token_weighted_damage_less(good).holds
    assert retain_at_forget_level(good, 0.5)["ga"] == pytest.approx(0.7)  # halfway between 0.9 and 0.5
    bad = _trajectories({"ga": 0.5, "npo": 0.75, "wga": 0.8, "tnpo": 0.7, "wtnpo": 0.85})
    check = token_weighted_damage_less(bad)
    assert not check.holds and check.evidence.endswith("not better than both baselines: tnpo")
    with pytest.raises(ValueError, match="needs runs of npo"):
        token_weighted_damage_less(_trajectories({"ga": 0.5, "wga": 0.8, "tnpo": 0.7, "wtnpo": 0.85}))


def test_verdict_over_seeds():
    yes, no = ga_retaining_negative([-1.0]), ga_retaining_negative([1.0])
    assert verdict([yes, yes, yes]) == "holds"
    assert verdict([no, no]) == "does not hold"
    assert verdict([yes, no, yes]) == "depends on the seed (holds for 2 of 3)"


def test_verdict_says_so_when_the_numbers_cannot_decide():
    from geffect_kernels.eval.observations import CLAIMS, Check
    undecided = Check(CLAIMS["e"], None, "not measurable: no probe where the NPO weights differ")
    assert verdict([ga_retaining_negative([-1.0]), undecided]) == "not decided by these numbers"


def test_g_guided_variant_against_its_objective():
    better = guidance_damage_less(_trajectories({"ga": 0.5, "ga+rectify": 0.7}), "ga+rectify")
    assert better.holds and better.claim.startswith("ga+rectify: ")
    assert better.evidence == ("at forget probability 0.1 (from 0.9) the retain probability is ga+rectify 0.7, "
                               "ga 0.5")
    assert not guidance_damage_less(_trajectories({"ga": 0.5, "ga+rectify": 0.4}), "ga+rectify").holds
    # the guided run forgets less (down to 0.5 only): compared where both got, halfway for ga (0.7)
    shallow = _trajectories({"ga": 0.5}) + [
        {"objective": "npo+instance", "step": 0, "probe_forget_probability": 0.9, "probe_retain_probability": 0.9},
        {"objective": "npo+instance", "step": 2, "probe_forget_probability": 0.5, "probe_retain_probability": 0.69},
        {"objective": "npo", "step": 0, "probe_forget_probability": 0.9, "probe_retain_probability": 0.9},
        {"objective": "npo", "step": 2, "probe_forget_probability": 0.1, "probe_retain_probability": 0.5}]
    check = guidance_damage_less(shallow, "npo+instance")
    assert not check.holds and "forget probability 0.5 " in check.evidence and "npo 0.7" in check.evidence
    with pytest.raises(ValueError, match="needs runs of npo and npo\\+rectify"):
        guidance_damage_less(_trajectories({"ga": 0.5, "npo+rectify": 0.7}), "npo+rectify")


def test_f_leaves_guided_variants_out():
    rows = _trajectories({"ga": 0.5, "npo": 0.6, "wga": 0.8, "tnpo": 0.7, "wtnpo": 0.85})
    rows += [{"objective": "ga+rectify", "step": 0, "probe_forget_probability": 0.9, "probe_retain_probability": 0.9},
             {"objective": "ga+rectify", "step": 2, "probe_forget_probability": 0.6, "probe_retain_probability": 0.95}]
    assert token_weighted_damage_less(rows) == token_weighted_damage_less(rows[:-2])


def test_h_i_po_and_rmu_against_ga():
    from geffect_kernels.eval.observations import po_unlearns_weaker, rmu_retains_better
    sums = {"ga": {"forget": -5.0, "retain": -2.0}, "po": {"forget": -1.0, "retain": -0.1},
            "rmu": {"forget": -0.3, "retain": -0.5}}
    assert po_unlearns_weaker(sums).holds and rmu_retains_better(sums).holds
    flipped = {**sums, "po": {"forget": 7.0, "retain": 0.0}, "rmu": {"forget": 0.0, "retain": 2.5}}
    assert not po_unlearns_weaker(flipped).holds and not rmu_retains_better(flipped).holds  # magnitudes count
    assert "po -1, ga -5" in po_unlearns_weaker(sums).evidence
    with pytest.raises(ValueError, match="needs runs of rmu and ga"):
        rmu_retains_better({"ga": sums["ga"]})
    assert po_unlearns_weaker({**sums, "po": {"forget": float("nan"), "retain": 0.0}}).holds is None


def test_j_k_retain_terms():
    from geffect_kernels.eval.observations import kl_rr_protect_less, nll_term_against_unlearning
    terms = {"ga": {"nll": {"forget": 0.4, "retain": 3.0}, "kl": {"forget": 0.0, "retain": 0.2},
                    "rr": {"forget": -0.1, "retain": 0.5}},
             "rmu": {"nll": {"forget": 0.1, "retain": 2.0}, "kl": {"forget": 0.0, "retain": 0.0},
                     "rr": {"forget": 0.0, "retain": 1.0}}}
    assert nll_term_against_unlearning(terms).holds and kl_rr_protect_less(terms).holds
    worse = {**terms, "rmu": {**terms["rmu"], "nll": {"forget": -0.2, "retain": 0.5}}}
    assert not nll_term_against_unlearning(worse).holds  # one objective's NLL term helps unlearning
    assert not kl_rr_protect_less(worse).holds  # RR (1.0) above the NLL term (0.5) beside rmu
    with pytest.raises(ValueError, match="needs the NLL, KL and RR"):
        kl_rr_protect_less({"ga": {"nll": terms["ga"]["nll"]}})
