"""Worker step metrics from LossOutput: same names for every loss, per-label means for KTO."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ray_dpo.losses import dpo_loss, loss_spec
from ray_dpo.policy.step_metrics import loss_metrics, metric_sums, sum_names

COUNTS = SimpleNamespace(real_tokens=10, padded_positions=12)


def cfg(type_, **kw):
    base = dict(type=type_, beta=0.5, label_smoothing=0.0, sft_weight=0.0, length_normalize=False, gamma=None,
                desirable_weight=None, undesirable_weight=None)
    return SimpleNamespace(**{**base, **kw})


def metrics_of(spec, out):
    totals = dict(zip(sum_names(spec), metric_sums(spec, out, COUNTS).tolist()))
    return loss_metrics(spec, "train", totals)


def test_kto_rewards_and_logps_are_means_over_their_label():
    # logratios (2, −1, 4) with labels (D, U, D): β r = (1, −0.5, 2); z_ref = 0 (given)
    t = lambda *x: torch.tensor(x)  # noqa: E731
    out = dpo_loss(policy_chosen_logps=t(-8.0, -6.0, -2.0), policy_rejected_logps=t(-1.0, -1.0, -1.0),
                   ref_chosen_logps=t(-10.0, -5.0, -6.0), ref_rejected_logps=t(-1.0, -1.0, -1.0),
                   config=cfg("kto"), labels=t(True, False, True), kl=torch.tensor(0.0))
    m = metrics_of(loss_spec("kto"), out)
    assert m["train/rewards/chosen"] == pytest.approx(1.5)  # (1 + 2) / 2 desirable
    assert m["train/rewards/rejected"] == pytest.approx(-0.5)
    assert m["train/rewards/margins"] == pytest.approx(2.0)
    assert m["train/logps/chosen"] == pytest.approx(-5.0) and m["train/logps/rejected"] == pytest.approx(-6.0)
    assert m["train/rewards/accuracies"] == pytest.approx(1.0) and m["train/kto/kl"] == 0.0


def test_simpo_uses_the_shared_names_and_no_reference():
    out = dpo_loss(policy_chosen_logps=torch.tensor([-2.0, -9.0]), policy_rejected_logps=torch.tensor([-8.0, -3.0]),
                   config=cfg("simpo"), chosen_n_tokens=torch.tensor([2, 3]), rejected_n_tokens=torch.tensor([4, 3]))
    m = metrics_of(loss_spec("simpo"), out)
    # β · mean log-probs: chosen (−0.5, −1.5), rejected (−1, −0.5); pair 0 ranked right, pair 1 not
    assert m["train/rewards/chosen"] == pytest.approx(-1.0) and m["train/rewards/rejected"] == pytest.approx(-0.75)
    assert m["train/rewards/accuracies"] == pytest.approx(0.5)
    assert set(m) == {"train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
                      "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected"}
