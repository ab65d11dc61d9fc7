"""ScoredPair strategies on hand-made scores (pure, no Ray)."""

import subprocess
import sys

import pytest

from ray_dpo.online.pairs import (
    Candidate,
    ScoredPair,
    PromptGroup,
    group_samples,
    make_pairs,
    pair_strategy_names,
)


def _g(pid, scores, chosen=None):
    samples = [Candidate(f"{pid}-s{i}", s) for i, s in enumerate(scores)]
    return PromptGroup(pid, f"prompt-{pid}", samples, None if chosen is None else Candidate(f"{pid}-data", chosen))


def test_registry_lists_both_strategies_and_rejects_unknown_names():
    assert pair_strategy_names() == ["best_vs_worst", "regenerate_rejected"]
    with pytest.raises(ValueError, match=r"unknown strategy 'best_vs_wrost' \(did you mean 'best_vs_worst'\?\); "
                                         r"valid: best_vs_worst, regenerate_rejected"):
        make_pairs([], strategy="best_vs_wrost")


def test_regenerate_rejected_keeps_data_chosen_and_takes_the_lowest_sample():
    groups = [
        _g("a", [0.5, 0.1, 0.3], chosen=0.9),   # lowest 0.1 < 0.9: kept
        _g("b", [0.95, 0.92], chosen=0.9),      # every sample beats the chosen: dropped
        _g("c", [0.4, 0.9, 0.2], chosen=0.4),   # lowest 0.2 < 0.4: kept, though one sample is better
        _g("d", [0.7, 0.7], chosen=0.7),        # equal: no margin
        _g("e", [], chosen=0.7),                # no samples: no pair
    ]
    pairs, counters = make_pairs(groups, strategy="regenerate_rejected", id_prefix="online-r1:")
    assert counters == {"candidates": 5, "kept": 2, "dropped_no_margin": 3}
    assert pairs == [
        ScoredPair("online-r1:a", "prompt-a", "a-data", "a-s1", 0.9, 0.1),
        ScoredPair("online-r1:c", "prompt-c", "c-data", "c-s2", 0.4, 0.2),
    ]
    assert pairs[0].margin == pytest.approx(0.8)


def test_regenerate_rejected_needs_the_data_sets_chosen():
    with pytest.raises(ValueError, match=r"prompt 'x' has none \(use pair_strategy best_vs_worst"):
        make_pairs([_g("x", [0.1, 0.2])], strategy="regenerate_rejected")


def test_best_vs_worst_of_n_samples():
    groups = [
        _g("a", [0.2, 0.8, 0.5, 0.1]),   # best s1, worst s3
        _g("b", [0.3, 0.3, 0.3]),        # all equal: dropped
        _g("c", [0.6]),                  # one sample: dropped
        _g("d", [0.9, 0.1, 0.9, 0.1]),   # ties go to the earliest: s0 vs s1
    ]
    pairs, counters = make_pairs(groups, strategy="best_vs_worst")
    assert counters == {"candidates": 4, "kept": 2, "dropped_no_margin": 2}
    assert [(p.pair_id, p.chosen, p.rejected) for p in pairs] == [("a", "a-s1", "a-s3"), ("d", "d-s0", "d-s1")]
    assert [p.margin for p in pairs] == [pytest.approx(0.7), pytest.approx(0.8)]


def test_best_vs_worst_ignores_the_data_sets_chosen():
    pairs, _ = make_pairs([_g("a", [0.2, 0.4], chosen=1.0)], strategy="best_vs_worst")
    assert (pairs[0].chosen, pairs[0].rejected) == ("a-s1", "a-s0")


@pytest.mark.parametrize("strategy,chosen", [("best_vs_worst", None), ("regenerate_rejected", 0.5)])
def test_min_margin_drops_small_margins(strategy, chosen):
    groups = [_g("a", [0.45, 0.5], chosen=chosen), _g("b", [0.0, 0.5], chosen=chosen)]
    pairs, counters = make_pairs(groups, strategy=strategy, min_margin=0.1)
    assert [p.pair_id for p in pairs] == ["b"]
    assert counters == {"candidates": 2, "kept": 1, "dropped_no_margin": 1}
    with pytest.raises(ValueError, match="min_margin must be >= 0"):
        make_pairs(groups, strategy=strategy, min_margin=-1)


def test_group_samples_splits_flat_scores_by_prompt():
    groups = group_samples(["p0", "p1"], [[1, 2], [3]], [["x", "y"], ["z", "w", "v"]], [0.1, 0.2, 0.3, 0.4, 0.5],
                           chosen=[Candidate("c0", 1.0), Candidate("c1", 0.0)])
    assert [g.prompt_id for g in groups] == ["p0", "p1"]
    assert groups[0].samples == [Candidate("x", 0.1), Candidate("y", 0.2)]
    assert groups[1].samples == [Candidate("z", 0.3), Candidate("w", 0.4), Candidate("v", 0.5)]
    assert groups[1].chosen == Candidate("c1", 0.0) and groups[1].prompt == [3]
    with pytest.raises(ValueError, match="4 scores for 5 responses"):
        group_samples(["p0", "p1"], [[1], [3]], [["x", "y"], ["z", "w", "v"]], [0.1] * 4)


def test_judges_pairs_and_evaluation_import_neither_ray_deepspeed_nor_vllm():
    code = ("import sys, ray_dpo.engines.judges, ray_dpo.online.pairs, ray_dpo.engines.evaluation\n"
            "print(','.join(m for m in ('ray', 'vllm', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
