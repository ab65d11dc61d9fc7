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


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def run(cfg: Cfg, pc, pr, rc, rr, **kw) -> LossOutput:
    return dpo_loss(
        policy_chosen_logps=pc, policy_rejected_logps=pr, ref_chosen_logps=rc, ref_rejected_logps=rr,
        config=cfg, **kw,
    )


# --- registry -------------------------------------------------------------------------


def test_registry_names_sorted_and_complete():
    assert loss_names() == ["hinge", "ipo", "robust", "sigmoid"]


def test_unknown_loss_error_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown loss type 'dpo'.*hinge, ipo, robust, sigmoid"):
        get_loss("dpo")
    with pytest.raises(ValueError, match="valid names: hinge, ipo, robust, sigmoid"):
        run(Cfg(type="simpo"), t(0.0), t(0.0), t(0.0), t(0.0))


def test_register_loss_rejects_duplicates_and_registers_new(monkeypatch):
    monkeypatch.setattr(losses, "_LOSSES", dict(losses._LOSSES))
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        register_loss("sigmoid")(lambda h, *, beta, label_smoothing: h)

    @register_loss("zero")
    def zero(h, *, beta, label_smoothing):
        return h * 0

    assert "zero" in loss_names() and get_loss("zero") is zero


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
