"""ray_dpo.losses: every expected number is computed by hand with `math`, never by the code
under test."""

from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from ray_dpo import losses
from ray_dpo.losses import LossOutput, dpo_loss, get_loss, loss_names, register_loss

LN2 = math.log(2.0)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@dataclasses.dataclass
class Cfg:
    """Stand-in for ray_dpo.config.LossConfig (dpo_loss duck-types it)."""

    type: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    length_normalize: bool = False
    gamma: float | None = None
    desirable_weight: float | None = None
    undesirable_weight: float | None = None


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def run(cfg: Cfg, pc, pr, rc, rr, **kw) -> LossOutput:
    return dpo_loss(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
        config=cfg, **kw,
    )


# --- registry -------------------------------------------------------------------------


def test_registry_names_sorted_and_complete():
    assert loss_names() == ["hinge", "ipo", "kto", "orpo", "robust", "sigmoid", "simpo"]


def test_unknown_loss_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss type 'dpo'.*hinge, ipo, kto, orpo, robust, sigmoid, simpo"):
        get_loss("dpo")
    with pytest.raises(ValueError, match="valid names: hinge, ipo, kto"):
        run(Cfg(type="cpo"), t(0.0), t(0.0), t(0.0), t(0.0))


def test_register_loss_rejects_duplicates_and_registers_new():
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        register_loss("sigmoid")(lambda h, *, beta, label_smoothing: h)

    @register_loss("zero")
    def zero(h, *, beta, label_smoothing):
        return h * 0

    try:
        assert "zero" in loss_names() and get_loss("zero") is zero
    finally:
        losses.LOSSES.remove("zero")
    assert "zero" not in loss_names()


def test_module_is_pure():
    tree = ast.parse(Path(losses.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"ray", "deepspeed", "vllm"}


# --- hand-computed values ---------------------------------------------------------------
# h = 0.5, β = 0.1 → βh = 0.05;  log σ(0.05) = -log(1 + e^-0.05) ≈ -0.668460,
#                                log σ(-0.05) = -log(1 + e^0.05)  ≈ -0.718460.
H, BETA, EPS = 0.5, 0.1, 0.2


def test_sigmoid_value():
    # −log σ(0.05) ≈ 0.668460
    expected = -log_sigmoid(BETA * H)
    got = get_loss("sigmoid")(t(H), beta=BETA, label_smoothing=0.0)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.668460, abs=1e-6)


def test_sigmoid_label_smoothing_value():
    # ε = 0.2: −0.8·log σ(0.05) − 0.2·log σ(−0.05) = 0.8·0.668460 + 0.2·0.718460 ≈ 0.678460
    expected = -(1 - EPS) * log_sigmoid(BETA * H) - EPS * log_sigmoid(-BETA * H)
    got = get_loss("sigmoid")(t(H), beta=BETA, label_smoothing=EPS)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.678460, abs=1e-6)


def test_robust_value():
    # ε = 0.2: (0.8·0.668460 − 0.2·0.718460) / 0.6 = (0.534768 − 0.143692) / 0.6 ≈ 0.651793
    expected = (-(1 - EPS) * log_sigmoid(BETA * H) + EPS * log_sigmoid(-BETA * H)) / (1 - 2 * EPS)
    got = get_loss("robust")(t(H), beta=BETA, label_smoothing=EPS)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.651793, abs=1e-6)


def test_robust_rejects_half_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing < 0.5"):
        get_loss("robust")(t(H), beta=BETA, label_smoothing=0.5)


def test_hinge_values():
    # relu(1 − 0.1·0.5) = 0.95; relu(1 − 0.1·20) = relu(−1) = 0; relu(1 − 0.1·(−3)) = 1.3
    got = get_loss("hinge")(t(0.5, 20.0, -3.0), beta=BETA, label_smoothing=0.3)
    torch.testing.assert_close(got, t(0.95, 0.0, 1.3))


def test_ipo_value():
    # (0.5 − 1/(2·0.1))² = (0.5 − 5)² = 20.25
    got = get_loss("ipo")(t(H), beta=BETA, label_smoothing=0.0)
    assert got.item() == pytest.approx(20.25, abs=1e-5)


# --- policy == reference --------------------------------------------------------------


@pytest.mark.parametrize(
    "type_, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.4), ("robust", 0.1), ("robust", 0.4)]
)
@pytest.mark.parametrize("beta", [0.01, 0.1, 2.0])
def test_sigmoid_family_is_ln2_when_policy_equals_reference(type_, eps, beta):
    pc, pr = t(-12.5, -3.0, -40.0), t(-8.0, -30.25, -1.5)
    out = run(Cfg(type=type_, beta=beta, label_smoothing=eps), pc, pr, pc.clone(), pr.clone())
    torch.testing.assert_close(out.losses, torch.full((3,), LN2), atol=1e-6, rtol=0)
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_hinge_and_ipo_at_h_zero(beta):
    pc, pr = t(-12.5, -3.0), t(-8.0, -30.25)
    hinge = run(Cfg(type="hinge", beta=beta), pc, pr, pc, pr).losses
    ipo = run(Cfg(type="ipo", beta=beta), pc, pr, pc, pr).losses
    torch.testing.assert_close(hinge, torch.ones(2))
    torch.testing.assert_close(ipo, torch.full((2,), 1 / (2 * beta) ** 2))


# --- dpo_loss: rewards, h, length normalisation, SFT term ------------------------------


def test_dpo_loss_forms_h_and_rewards():
    # pair 0: chosen ratio −10 − (−12) = 2, rejected ratio −20 − (−19) = −1 → h = 3
    # pair 1: chosen ratio −5 − (−4) = −1,  rejected ratio −6 − (−7) = 1   → h = −2
    out = run(Cfg(beta=0.5), t(-10.0, -5.0), t(-20.0, -6.0), t(-12.0, -4.0), t(-19.0, -7.0))
    torch.testing.assert_close(out.chosen_rewards, t(1.0, -0.5))  # 0.5 · (2, −1)
    torch.testing.assert_close(out.rejected_rewards, t(-0.5, 0.5))  # 0.5 · (−1, 1)
    expected = t(-log_sigmoid(0.5 * 3), -log_sigmoid(0.5 * -2))  # 0.201413, 1.313262
    torch.testing.assert_close(out.losses, expected)
    assert not out.chosen_rewards.requires_grad


def test_dpo_loss_rewards_are_detached_and_losses_carry_grad():
    pc = t(-10.0).requires_grad_()
    out = run(Cfg(), pc, t(-11.0), t(-10.5), t(-11.0))
    assert out.losses.requires_grad
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.losses = out.losses * 2  # type: ignore[misc]


def test_dpo_loss_length_normalize():
    # chosen: n = 4, logps policy −8 ref −10 → −2, −2.5, ratio 0.5
    # rejected: n = 2, logps policy −9 ref −8 → −4.5, −4, ratio −0.5
    # h = 1, β = 0.2 → loss = −log σ(0.2) ≈ 0.598139; rewards 0.1, −0.1
    out = run(
        Cfg(beta=0.2, length_normalize=True), t(-8.0), t(-9.0), t(-10.0), t(-8.0),
        chosen_n_tokens=torch.tensor([4]), rejected_n_tokens=torch.tensor([2]),
    )
    assert out.losses.item() == pytest.approx(-log_sigmoid(0.2), abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1, abs=1e-6)
    assert out.rejected_rewards.item() == pytest.approx(-0.1, abs=1e-6)


def test_length_normalize_without_counts_is_an_error():
    with pytest.raises(ValueError, match="length_normalize.*chosen_n_tokens and rejected_n_tokens"):
        run(Cfg(length_normalize=True), t(-1.0), t(-1.0), t(-1.0), t(-1.0), chosen_n_tokens=torch.tensor([3]))


def test_sft_term_is_added_per_pair():
    # policy == ref → DPO part ln 2; sft_weight 0.5 · nll (1.2, 3.0) → ln 2 + (0.6, 1.5)
    pc, pr = t(-3.0, -4.0), t(-5.0, -6.0)
    nll = t(1.2, 3.0)
    out = run(Cfg(sft_weight=0.5), pc, pr, pc, pr, policy_chosen_nll=nll)
    torch.testing.assert_close(out.losses, t(LN2 + 0.6, LN2 + 1.5))
    # sft_weight = 0 ignores the nll entirely
    out0 = run(Cfg(sft_weight=0.0), pc, pr, pc, pr, policy_chosen_nll=nll)
    torch.testing.assert_close(out0.losses, torch.full((2,), LN2))


def test_sft_without_nll_is_an_error():
    with pytest.raises(ValueError, match="sft_weight > 0 needs policy_chosen_nll"):
        run(Cfg(sft_weight=0.1), t(-1.0), t(-1.0), t(-1.0), t(-1.0))


def test_mismatched_shapes_are_an_error():
    # [B] against [B, 1] would otherwise broadcast to a [B, B] loss.
    with pytest.raises(ValueError, match="same shape"):
        run(Cfg(), t(-1.0, -2.0), t(-1.0, -2.0), t(-1.0, -2.0).unsqueeze(1), t(-1.0, -2.0))


def test_reference_logps_follow_policy_dtype():
    out = run(Cfg(), t(-1.0), t(-2.0), torch.tensor([-1.5], dtype=torch.float64), t(-2.0))
    assert out.losses.dtype == torch.float32


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("h", [-4.0, -0.3, 0.0, 0.7, 6.0])
def test_sigmoid_gradient_closed_form(h):
    # d/d pc [−log σ(βh)] = −β σ(−βh) (dh/d pc = 1): always < 0, i.e. descent raises log π(y_w)
    beta = 0.3
    pc = torch.tensor([h - 5.0], requires_grad=True)
    out = run(Cfg(beta=beta), pc, t(-3.0), t(-5.0), t(-3.0))  # h = (pc + 5) − 0
    out.losses.sum().backward()
    expected = -beta / (1 + math.exp(beta * h))  # σ(−βh) = 1 / (1 + e^{βh})
    assert pc.grad.item() == pytest.approx(expected, rel=1e-5)
    assert pc.grad.item() < 0


@pytest.mark.parametrize("type_", ["sigmoid", "robust", "hinge", "ipo"])
def test_gradient_signs(type_):
    # At h = 0.5 (β = 0.1, ε = 0.1), every loss wants a larger h: d/d pc < 0 and
    # d/d pr > 0 — for IPO because h = 0.5 < 1/(2β) = 5, for hinge because βh < 1.
    pc, pr = torch.tensor([-4.5], requires_grad=True), torch.tensor([-6.0], requires_grad=True)
    out = run(Cfg(type=type_, beta=0.1, label_smoothing=0.1), pc, pr, t(-5.0), t(-6.0))
    out.losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    assert pc.grad.item() == pytest.approx(-pr.grad.item())


# --- registry facts ----------------------------------------------------------------------


def test_registry_entries_carry_their_facts():
    facts = {name: (losses.loss_spec(name).needs_reference, losses.loss_spec(name).data) for name in loss_names()}
    assert facts == {"sigmoid": (True, "pairs"), "robust": (True, "pairs"), "hinge": (True, "pairs"),
                     "ipo": (True, "pairs"), "simpo": (False, "pairs"), "orpo": (False, "pairs"),
                     "kto": (True, "unpaired")}
    assert "gamma" in losses.loss_spec("simpo").reads and "gamma" not in losses.loss_spec("sigmoid").reads
    assert losses.loss_spec("kto").metrics == ("kto/kl",)


def test_reference_losses_refuse_missing_reference_logps():
    with pytest.raises(ValueError, match="'sigmoid' needs reference log-probs"):
        dpo_loss(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-2.0), config=Cfg())


# --- SimPO -------------------------------------------------------------------------------
# chosen −6 over 3 tokens → mean −2; rejected −12 over 4 → mean −3. β = 2, γ = 0.5:
# z = 2·(−2 − (−3)) − 0.5 = 1.5 → loss = −log σ(1.5) = log(1 + e^−1.5) ≈ 0.201413.


def simpo(pc, pr, n_c, n_r, **cfg):
    return dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, config=Cfg(type="simpo", **cfg),
                    chosen_n_tokens=torch.tensor(n_c), rejected_n_tokens=torch.tensor(n_r))


def test_simpo_value_and_rewards_without_reference():
    out = simpo(t(-6.0), t(-12.0), [3], [4], beta=2.0, gamma=0.5)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert math.log1p(math.exp(-1.5)) == pytest.approx(0.201413, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-4.0) and out.rejected_rewards.item() == pytest.approx(-6.0)
    assert out.correct.item() == 1.0


def test_simpo_gradient_closed_form():
    # d loss / d pc = −σ(−z) · β / |y_w| = −σ(−1.5) · 2/3 ≈ −0.121617; d / d pr = +σ(−1.5) · 2/4
    pc, pr = torch.tensor([-6.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    simpo(pc, pr, [3], [4], beta=2.0, gamma=0.5).losses.sum().backward()
    sig = 1 / (1 + math.exp(1.5))
    assert pc.grad.item() == pytest.approx(-sig * 2 / 3, rel=1e-5)
    assert pr.grad.item() == pytest.approx(sig * 2 / 4, rel=1e-5)
    assert sig * 2 / 3 == pytest.approx(0.121617, abs=1e-6)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.6])
def test_simpo_equal_mean_logps_give_log1p_exp_gamma(gamma):
    # −log σ(−γ) = log(1 + e^γ); γ = 0 is ln 2. Unset γ is TRL's 0.5.
    out = simpo(t(-6.0, -1.0), t(-8.0, -0.5), [3, 2], [4, 1], beta=2.5, gamma=gamma)
    torch.testing.assert_close(out.losses, torch.full((2,), math.log1p(math.exp(gamma))))
    unset = simpo(t(-6.0), t(-8.0), [3], [4], beta=2.5)
    assert unset.losses.item() == pytest.approx(math.log1p(math.exp(0.5)), abs=1e-6)


# --- ORPO --------------------------------------------------------------------------------
# chosen −1.5 over 3 → m_w = −0.5; rejected −4 over 4 → m_l = −1.
# log odds(m) = m − log(1 − e^m): −0.5 + 0.932752 = 0.432752 and −1 + 0.458675 = −0.541325,
# difference d = 0.974077; L_OR = log(1 + e^−d) ≈ 0.320300; λ = 0.1 → 0.5 + 0.032030 = 0.532030.


def log_odds(m: float) -> float:
    return m - math.log(1 - math.exp(m))


def orpo(pc, pr, n_c, n_r, beta=0.1):
    return dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, config=Cfg(type="orpo", beta=beta),
                    chosen_n_tokens=torch.tensor(n_c), rejected_n_tokens=torch.tensor(n_r))


def test_orpo_value_and_metrics():
    d = log_odds(-0.5) - log_odds(-1.0)
    assert d == pytest.approx(0.974077, abs=1e-6)
    out = orpo(t(-1.5), t(-4.0), [3], [4])
    assert out.losses.item() == pytest.approx(0.5 + 0.1 * math.log1p(math.exp(-d)), abs=1e-6)
    assert out.losses.item() == pytest.approx(0.532030, abs=1e-6)
    assert out.extras["orpo/log_odds_chosen"].item() == pytest.approx(d, abs=1e-6)
    assert out.extras["orpo/log_odds_ratio"].item() == pytest.approx(log_sigmoid(d), abs=1e-6)
    assert out.extras["orpo/nll_loss"].item() == pytest.approx(0.5)
    assert out.chosen_rewards.item() == pytest.approx(-0.05) and out.rejected_rewards.item() == pytest.approx(-0.1)


def test_orpo_gradient_closed_form():
    # d/d m_w [−m_w − λ log σ(d)] = −1 − λ σ(−d) · 1/(1 − e^{m_w}); pc = 3 m_w → divide by 3
    pc = torch.tensor([-1.5], requires_grad=True)
    orpo(pc, t(-4.0), [3], [4]).losses.sum().backward()
    d = log_odds(-0.5) - log_odds(-1.0)
    expected = (-1 - 0.1 * (1 / (1 + math.exp(d))) / (1 - math.exp(-0.5))) / 3
    assert pc.grad.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("m", [-3.0, -0.7, -1e-3])
def test_orpo_equal_mean_logps_give_nll_plus_lambda_ln2(m):
    out = orpo(t(3 * m), t(2 * m), [3], [2], beta=0.2)
    assert out.losses.item() == pytest.approx(-m + 0.2 * LN2, abs=1e-5)


def test_orpo_stays_finite_at_probability_one_and_log1mexp_is_accurate():
    out = orpo(t(0.0), t(-4.0), [3], [4])
    assert torch.isfinite(out.losses).all()
    x = torch.tensor([-1e-8, -0.1, -0.7, -5.0, -50.0], dtype=torch.float64)
    expected = [math.log(-math.expm1(v)) for v in x.tolist()]
    torch.testing.assert_close(losses.log1mexp(x), torch.tensor(expected, dtype=torch.float64))


# --- KTO ---------------------------------------------------------------------------------


def kto(pc, pr, rc, rr, labels, kl=None, **cfg):
    return dpo_loss(policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
                    config=Cfg(type="kto", **cfg), labels=torch.tensor(labels), kl=kl)


@pytest.mark.parametrize("wd, wu", [(1.0, 1.0), (1.5, 0.5), (1.33, 1.0)])
def test_kto_policy_equals_reference_and_zero_kl_is_half_lambda(wd, wu):
    # r = 0, z_ref = 0: λ_y − λ_y σ(0) = λ_y / 2 (the paper's closed form).
    pc, pr = t(-5.0, -7.0, -2.0), t(-6.0, -3.0, -4.0)
    out = kto(pc, pr, pc.clone(), pr.clone(), [True, False, True], beta=0.3,
              desirable_weight=wd, undesirable_weight=wu)
    torch.testing.assert_close(out.losses, t(wd / 2, wu / 2, wd / 2))
    assert torch.all(out.extras["kto/kl"] == 0)


def test_kto_value_with_batch_kl_estimate():
    # Completions: desirable r = −8 − (−10) = 2, undesirable r = −6 − (−5) = −1.
    # Mismatched pairs: log-ratios −4 − (−4.4) = 0.4 and −3 − (−3.2) = 0.2 → z_ref = 0.3.
    # β = 0.5: desirable 1 − σ(0.5·(2 − 0.3)) = σ(−0.85) ≈ 0.299432;
    #          undesirable 1 − σ(0.5·(0.3 + 1)) = σ(−0.65) ≈ 0.342990.
    out = kto(t(-8.0, -6.0), t(-4.0, -3.0), t(-10.0, -5.0), t(-4.4, -3.2), [True, False], beta=0.5)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    torch.testing.assert_close(out.losses, t(sig(-0.85), sig(-0.65)))
    assert sig(-0.85) == pytest.approx(0.299432, abs=1e-6) and sig(-0.65) == pytest.approx(0.342990, abs=1e-6)
    torch.testing.assert_close(out.extras["kto/kl"], t(0.3, 0.3))
    torch.testing.assert_close(out.chosen_rewards, t(1.0, -0.5))  # β r, read through the masks
    assert out.chosen_mask.tolist() == [True, False] and out.rejected_mask.tolist() == [False, True]
    assert out.correct.tolist() == [1.0, 1.0]


def test_kto_kl_is_clamped_at_zero_and_can_be_given():
    out = kto(t(-8.0), t(-4.0), t(-8.0), t(-3.0), [True], beta=0.5)  # batch estimate −1 → 0
    assert out.extras["kto/kl"].item() == 0.0 and out.losses.item() == pytest.approx(0.5)
    given = kto(t(-8.0), t(-4.0), t(-8.0), t(-3.0), [True], kl=torch.tensor(2.0), beta=0.5)
    assert given.losses.item() == pytest.approx(1 - 1 / (1 + math.exp(1.0)), abs=1e-6)  # 1 − σ(−1)


def test_kto_gradient_closed_form_and_no_gradient_through_kl():
    # desirable: d/d pc λ_D(1 − σ(β(r − z))) = −λ_D β σ(x) σ(−x), x = β(r − z) = 0.5·(2 − 0.3)
    pc = torch.tensor([-8.0, -6.0], requires_grad=True)
    pr = torch.tensor([-4.0, -3.0], requires_grad=True)
    out = kto(pc, pr, t(-10.0, -5.0), t(-4.4, -3.2), [True, False], beta=0.5, desirable_weight=2.0)
    out.losses.sum().backward()
    x, y = 0.5 * 1.7, 0.5 * 1.3
    s = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert pc.grad[0].item() == pytest.approx(-2.0 * 0.5 * s(x) * s(-x), rel=1e-5)
    assert pc.grad[1].item() == pytest.approx(+0.5 * s(y) * s(-y), rel=1e-5)  # undesirable: pushed down
    assert pr.grad is None or torch.all(pr.grad == 0)


def test_kto_without_labels_is_an_error():
    with pytest.raises(ValueError, match="kto needs labels"):
        dpo_loss(policy_chosen_logps=t(-1.0), policy_rejected_logps=t(-1.0), ref_chosen_logps=t(-1.0),
                 ref_rejected_logps=t(-1.0), config=Cfg(type="kto"))


def test_margins_within_float_noise_are_ties_not_pairs_ranked_right():
    """Step 1: policy = reference up to kernel noise (~1e-6 of a log-prob of -50): no pair
    is ranked right yet, whichever way the noise falls; a real margin still counts."""
    pc, pr = t(-50.0, -40.0, -30.0), t(-52.0, -41.0, -35.0)
    noise = t(3e-6, -2e-6, 0.0)
    out = run(Cfg(beta=0.1), pc + noise, pr - noise, pc, pr)
    assert out.correct.tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out.losses, torch.full((3,), math.log(2.0)))
    out = run(Cfg(beta=0.1), pc + t(0.01, 0.0, -0.01), pr, pc, pr)
    assert out.correct.tolist() == [1.0, 0.0, 0.0]
    for loss in ("simpo", "orpo"):
        same = run(Cfg(type=loss, beta=0.1), pc, pc + t(1e-6, -1e-6, 0.0), pc, pc,
                   chosen_n_tokens=t(10, 10, 10), rejected_n_tokens=t(10, 10, 10))
        assert same.correct.tolist() == [0.0, 0.0, 0.0], loss
