"""Networks against hand-computed cases, a plain-autograd reference and float64 gradchecks."""

from __future__ import annotations

import math
from typing import cast

import pytest
import torch
from torch.autograd import gradcheck
from torch.func import functional_call
from torch.nn import functional as F

from tauopt.models import (
    FractionalDNN,
    TauNetwork,
    TauResNet,
    _fractional,
    l1_memory_coefficients,
    reference_forward,
)
from tauopt.models._stack import hidden_stack

torch.set_default_dtype(torch.float32)


def _scalar_net(cls: type[TauNetwork], depth: int, a: float, **kw: object) -> TauNetwork:
    """Width-1 net: W_0 = 1, W_l = a, no biases, output 1; relu is the identity for x > 0."""
    model = cls(1, 1, depth, 1, **kw).double()  # type: ignore[arg-type]
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.weight.fill_(1.0 if i == 0 else a)
            block.bias.zero_()
        model.output.weight.fill_(1.0)
    return model


def _randomise_taus(model: TauNetwork, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.tau_free.mul_(
            0.5 + torch.rand(model.tau_free.shape, generator=gen, dtype=model.tau_free.dtype)
        )


# --- hand-computed cases -------------------------------------------------------------------


def test_linear_resnet_is_a_product_of_euler_factors() -> None:
    model = _scalar_net(TauResNet, 4, a=0.7, T=2.0)
    with torch.no_grad():
        model.tau_free.copy_(torch.tensor([0.5, 0.25, 1.0, 0.125], dtype=torch.float64))
    x = torch.tensor([[3.0]], dtype=torch.float64)
    expected = 3.0 * 0.5 * (1 + 0.25 * 0.7) * (1 + 1.0 * 0.7) * (1 + 0.125 * 0.7)
    assert model(x).item() == pytest.approx(expected, rel=1e-12)


def test_equal_steps_give_the_classic_l1_weights() -> None:
    gamma, h, n = 0.3, 0.2, 6
    coeff = l1_memory_coefficients(torch.full((n,), h, dtype=torch.float64), gamma)
    for l in range(n):
        for j in range(n):
            k = l - j
            expected = (k + 1) ** (1 - gamma) - k ** (1 - gamma) if j < l else 0.0
            assert coeff[l, j].item() == pytest.approx(expected, abs=1e-12)


def test_variable_step_coefficient_by_hand() -> None:
    taus = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    gamma = 0.5
    coeff = l1_memory_coefficients(taus, gamma)
    # a_{2,0} = tau_2^g / tau_0 * ((tau_0+tau_1+tau_2)^(1-g) - (tau_1+tau_2)^(1-g))
    expected = 0.3**0.5 / 0.5 * (1.0**0.5 - 0.5**0.5)
    assert coeff[2, 0].item() == pytest.approx(expected, rel=1e-12)
    assert coeff[2, 1].item() == pytest.approx(0.3**0.5 / 0.2 * (0.5**0.5 - 0.3**0.5), rel=1e-12)


def test_linear_fractional_network_by_hand() -> None:
    gamma, a = 0.5, 0.4
    model = _scalar_net(FractionalDNN, 3, a=a, gamma=gamma, T=1.0)
    taus = [0.5, 0.2, 0.3]
    with torch.no_grad():
        model.tau_free.copy_(torch.tensor(taus, dtype=torch.float64))
    x = 2.0
    s = math.gamma(2 - gamma)
    u1 = taus[0] ** gamma * s * x
    u2 = u1 + taus[1] ** gamma * s * a * u1 - (0.2**0.5 / 0.5 * (0.7**0.5 - 0.2**0.5)) * u1
    a20 = 0.3**0.5 / 0.5 * (1.0**0.5 - 0.5**0.5)
    a21 = 0.3**0.5 / 0.2 * (0.5**0.5 - 0.3**0.5)
    u3 = u2 + taus[2] ** gamma * s * a * u2 - a20 * u1 - a21 * (u2 - u1)
    assert model(torch.tensor([[x]], dtype=torch.float64)).item() == pytest.approx(u3, rel=1e-12)


# --- fused stack against the plain formulas ------------------------------------------------

NETWORKS = [
    (TauResNet, {}),
    (TauResNet, {"dependent_last_tau": True}),
    (FractionalDNN, {}),
    (FractionalDNN, {"gamma": 0.3, "dependent_last_tau": True}),
    (FractionalDNN, {"detach_memory": True}),
]


@pytest.mark.parametrize(("cls", "kw"), NETWORKS)
def test_fused_forward_and_gradients_match_reference(
    cls: type[TauNetwork], kw: dict[str, object]
) -> None:
    torch.manual_seed(1)
    model = cls(7, 5, 4, 3, T=2.0, **kw).double()  # type: ignore[arg-type]
    _randomise_taus(model)
    x = torch.rand(6, 7, dtype=torch.float64)
    out, ref = model(x), reference_forward(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


# detach_memory deliberately drops part of the derivative, so only the exact variants are checked
# against finite differences (the detached one is checked against the reference above).
@pytest.mark.parametrize(("cls", "kw"), NETWORKS[:4])
def test_gradcheck_with_respect_to_taus(cls: type[TauNetwork], kw: dict[str, object]) -> None:
    torch.manual_seed(2)
    model = cls(5, 4, 4, 3, T=1.5, **kw).double()  # type: ignore[arg-type]
    _randomise_taus(model, seed=3)
    x = torch.rand(3, 5, dtype=torch.float64)
    tau = model.tau_free.detach().clone().requires_grad_()

    def f(t: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = functional_call(model, {"tau_free": t}, (x,))
        return out

    assert gradcheck(f, (tau,))


@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("depth", [1, 2, 5])
def test_gradcheck_hidden_stack_all_inputs(memory: bool, depth: int) -> None:
    gen = torch.Generator().manual_seed(depth)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = rand(4, 5)
    weights = [rand(3, 5)] + [rand(3, 3) for _ in range(depth - 1)]
    biases = [rand(3) for _ in range(depth)]
    forcing = (torch.rand(depth, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    coeff = torch.randn(depth, depth, generator=gen, dtype=torch.float64).tril(-1).requires_grad_()

    def f(
        x: torch.Tensor, forcing: torch.Tensor, coeff: torch.Tensor, *p: torch.Tensor
    ) -> torch.Tensor:
        return hidden_stack(x, forcing, coeff if memory else None, list(p[0::2]), list(p[1::2]))

    params = [t for pair in zip(weights, biases, strict=True) for t in pair]
    assert gradcheck(f, (x, forcing, coeff, *params))


def test_gradcheck_memory_coefficients() -> None:
    taus = (torch.rand(6, dtype=torch.float64) + 0.05).requires_grad_()
    assert gradcheck(lambda t: l1_memory_coefficients(t, 0.35), (taus,))


# --- pruning, constraints, validation ------------------------------------------------------


def test_pruning_a_zero_tau_block_leaves_the_output_unchanged() -> None:
    torch.manual_seed(4)
    model = TauResNet(8, 6, 5, 3)
    with torch.no_grad():
        model.tau_free[2] = 0.0
    x = torch.rand(10, 8)
    before = model(x)
    params_before = model.num_active_params()
    removed = model.prune(0.01)
    assert removed == [2]
    assert model.depth == 4 and len(model.taus) == 4
    assert model.block_ids == [0, 1, 3, 4]
    assert model.num_active_params() == params_before - (6 * 6 + 6 + 1)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_pruning_never_removes_the_input_block_or_the_dependent_last() -> None:
    model = TauResNet(4, 3, 4, 2, dependent_last_tau=True, T=1.0)
    with torch.no_grad():
        model.tau_free.copy_(torch.tensor([1e-6, 0.5, 1e-6]))
    # taus = [1e-6, 0.5, 1e-6, 0.5 - 2e-6]: only the middle tiny block may go.
    assert model.prune(0.1) == [2]
    assert model.block_ids == [0, 1, 3]
    assert model.taus.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_linear_layers_in_forward_order() -> None:
    model = FractionalDNN(784, 100, 6, 10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(100, 784)] + [(100, 100)] * 5 + [(10, 100)]
    assert linears[-1].bias is None
    assert torch.allclose(model.taus, torch.full((6,), 1 / 6))


def test_fractional_projection_keeps_tau_min() -> None:
    model = FractionalDNN(3, 2, 3, 2, tau_min=1e-3)
    with torch.no_grad():
        model.tau_free.copy_(torch.tensor([-1.0, 0.0, 0.2]))
    model.project_taus_()
    assert model.taus.tolist() == pytest.approx([1e-3, 1e-3, 0.2])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 0}, "depth must be a positive integer"),
        ({"T": -1.0}, "T must be a positive"),
        ({"dependent_last_tau": True, "depth": 1}, "dependent_last_tau needs depth >= 2"),
        ({"gamma": 1.0}, "gamma"),
        ({"tau_min": 1.0}, "tau_min"),
    ],
)
def test_constructor_rejects_bad_input(kwargs: dict[str, object], message: str) -> None:
    args = {"in_features": 4, "width": 3, "depth": 3, "num_classes": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FractionalDNN(**args)  # type: ignore[arg-type]


def test_fixed_tau_mode_has_no_tau_gradient() -> None:
    model = TauResNet(4, 3, 3, 2, trainable_tau=False)
    model(torch.rand(2, 4)).sum().backward()
    assert model.tau_free.grad is None
    assert model.blocks[1].weight.grad is not None


@pytest.mark.parametrize("cls", [TauResNet, FractionalDNN])
def test_a_fixed_input_tau_stays_while_the_others_train(cls: type[TauNetwork]) -> None:
    """The papers' code's "fixed" ResNet: the input block's tau gets no gradient, the hidden
    blocks' taus get theirs, through autograd and through the hand-written step alike."""
    torch.manual_seed(3)
    model = cls(4, 8, 3, 2, T=1.5, fixed_input_tau=True).double()
    x, y = torch.rand(16, 4, dtype=torch.float64), torch.randint(0, 2, (16,))
    F.cross_entropy(model(x), y).backward()
    grad = model.tau_free.grad
    assert grad is not None and float(grad[0]) == 0.0 and bool(grad[1:].ne(0).all())
    model.zero_grad()
    model.loss_and_grad(x, y, l1=0.5)  # l1 pulls on every tau; the input one must not move
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    model.project_taus_()
    assert float(model.taus[0]) == 0.5 and bool(model.taus[1:].ne(0.5).all())
    with pytest.raises(ValueError, match="fixes every tau already"):
        cls(4, 3, 3, 2, trainable_tau=False, fixed_input_tau=True)


# --- the autograd-free training step ---------------------------------------------------------

STEP_CASES = [
    (TauResNet, {}, 0.0, 0.0),
    (TauResNet, {"dependent_last_tau": True}, 0.3, 0.0),
    (TauResNet, {}, 0.2, 1.5),
    (TauResNet, {"trainable_tau": False}, 0.0, 0.0),
    (TauResNet, {"fixed_input_tau": True}, 0.2, 1.5),
    (TauResNet, {"fixed_input_tau": True, "dependent_last_tau": True}, 0.1, 0.0),
    (FractionalDNN, {"fixed_input_tau": True, "dependent_last_tau": True}, 0.1, 0.3),
    (FractionalDNN, {}, 0.1, 0.7),
    (FractionalDNN, {"dependent_last_tau": True, "gamma": 0.3}, 0.2, 0.0),
    (FractionalDNN, {"detach_memory": True}, 0.0, 0.0),
]


def _assert_step_matches_autograd(
    model: TauNetwork, x: torch.Tensor, y: torch.Tensor, l1: float = 0.0, horizon: float = 0.0
) -> None:
    loss = model.loss_and_grad(x, y, l1=l1, horizon_weight=horizon)
    manual = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    taus = model.taus
    ref = F.cross_entropy(reference_forward(model, x), y) + l1 * taus.abs().sum()
    ref = ref + horizon * (taus.sum() - model.T).square()
    ref.backward()
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    assert manual.keys() == expected.keys()
    for name, grad in expected.items():
        torch.testing.assert_close(manual[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    model.zero_grad()


@pytest.mark.parametrize(("cls", "kw", "l1", "horizon"), STEP_CASES)
def test_loss_and_grad_matches_autograd(
    cls: type[TauNetwork], kw: dict[str, object], l1: float, horizon: float
) -> None:
    torch.manual_seed(5)
    model = cls(7, 5, 4, 3, T=2.0, **kw).double()  # type: ignore[arg-type]
    _randomise_taus(model, seed=6)
    x = torch.rand(8, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    _assert_step_matches_autograd(model, x, y, l1, horizon)


@pytest.mark.parametrize("cls", [TauResNet, FractionalDNN])
def test_loss_and_grad_buffers_follow_the_model(cls: type[TauNetwork]) -> None:
    """The step keeps its buffers between calls: they must follow a new batch size, weights
    changed in place or swapped, and (ResNet) a pruned, shallower network."""
    torch.manual_seed(8)
    model = cls(7, 5, 4, 3, T=2.0).double()
    _randomise_taus(model, seed=9)
    x = torch.rand(8, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    _assert_step_matches_autograd(model, x, y, l1=0.1)
    _assert_step_matches_autograd(model, x[:5], y[:5])  # a short last batch
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # what the optimiser does
    _assert_step_matches_autograd(model, x, y)
    first = cast(torch.nn.Linear, model.blocks[1])
    first.weight.data = first.weight.data * 1.5  # new storage under the same parameter
    _assert_step_matches_autograd(model, x, y)
    if isinstance(model, TauResNet):
        with torch.no_grad():
            model.tau_free[2] = 0.0
        assert model.prune(0.05) == [2]
        _assert_step_matches_autograd(model, x, y)


def test_fractional_step_with_degenerate_taus_gives_nan_not_an_exception() -> None:
    """A blown-up tau makes a later span round to zero (seen in a diverging study trial):
    the step must yield nan, which the engine reports as divergence, not raise."""
    torch.manual_seed(10)
    model = FractionalDNN(3, 4, 3, 2)
    with torch.no_grad():
        model.tau_free.copy_(torch.tensor([1e20, 1e-4, 1e-4]))
    x, y = torch.rand(5, 3), torch.randint(0, 2, (5,))
    model.loss_and_grad(x, y)
    assert model.tau_free.grad is not None
    assert not torch.isfinite(model.tau_free.grad).all()
    with torch.no_grad():
        model.tau_free.zero_()  # a zero step: 1/tau and tau^(gamma-1)
    model.loss_and_grad(x, y)
    assert not torch.isfinite(model.tau_free.grad).all()
    assert not torch.isfinite(model(x)).all()


@pytest.fixture()
def device_arithmetic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fractional step's tau arithmetic as device ops (what a GPU runs), here on the CPU."""
    monkeypatch.setattr(_fractional, "host_arithmetic", lambda device: False)


@pytest.mark.parametrize(
    ("kw", "l1", "horizon"), [case[1:] for case in STEP_CASES if case[0] is FractionalDNN]
)
@pytest.mark.usefixtures("device_arithmetic")
def test_fractional_step_with_device_arithmetic_matches_autograd(
    kw: dict[str, object], l1: float, horizon: float
) -> None:
    torch.manual_seed(11)
    model = FractionalDNN(7, 5, 5, 3, T=2.0, **kw).double()  # type: ignore[arg-type]
    _randomise_taus(model, seed=12)
    x = torch.rand(8, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    _assert_step_matches_autograd(model, x, y, l1, horizon)
    if model.dependent_last_tau:  # the derived last tau below tau_min: clamped, no gradient
        with torch.no_grad():
            model.tau_free.copy_(torch.tensor([0.6, 0.5, 0.5, 0.45], dtype=torch.float64))
        _assert_step_matches_autograd(model, x, y, l1, horizon)


@pytest.mark.usefixtures("device_arithmetic")
def test_fractional_device_arithmetic_with_degenerate_taus_gives_non_finite() -> None:
    torch.manual_seed(10)
    model = FractionalDNN(3, 4, 3, 2)
    with torch.no_grad():
        model.tau_free.zero_()
    model.loss_and_grad(torch.rand(5, 3), torch.randint(0, 2, (5,)))
    assert model.tau_free.grad is not None
    assert not torch.isfinite(model.tau_free.grad).all()


@pytest.mark.parametrize("cls", [TauResNet, FractionalDNN])
def test_image_batches_are_taken_as_torchvision_gives_them(cls: type[TauNetwork]) -> None:
    torch.manual_seed(0)
    model = cls(16, 5, 3, 4, T=1.0, trainable_tau=True, dependent_last_tau=False).eval()
    pixels = torch.randint(0, 256, (6, 4, 4), dtype=torch.uint8)
    rows = pixels.reshape(6, 16).float() / 255.0
    expected = model(rows)
    for x in (rows.reshape(6, 4, 4), rows.reshape(6, 1, 4, 4), pixels, pixels[:, None]):
        assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\(N, 16\).*got \(6, 5, 5\)"):
        model(torch.zeros(6, 5, 5))
    with pytest.raises(ValueError, match="unsqueeze"):
        model(torch.zeros(16))


# --- the papers' variants: projected last tau, pruning the smallest block ---------------------


@pytest.mark.parametrize("cls", [TauResNet, FractionalDNN])
def test_projected_last_tau_trains_the_others_and_is_then_overwritten(
    cls: type[TauNetwork],
) -> None:
    """The papers' code: the other taus' gradients do not see the constraint; after the
    step the last tau is ``T`` minus the others."""
    torch.manual_seed(3)
    model = cls(5, 4, 4, 3, T=2.0, projected_last_tau=True).double()
    x, y = torch.rand(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    model.loss_and_grad(x, y, l1=0.1, horizon_weight=0.3)
    grad = model.tau_free.grad.clone()
    assert float(grad[-1]) == 0.0
    # the same as autograd with every tau free, the last one's gradient dropped
    free = model.tau_free.detach().clone().requires_grad_()
    loss = torch.func.functional_call(_Loss(model, x, y, 0.1, 0.3), {"model.tau_free": free}, ())
    (expected,) = torch.autograd.grad(loss, free)
    torch.testing.assert_close(grad[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        model.tau_free -= 0.5 * model.tau_free.grad
    model.project_taus_()
    assert float(model.taus.detach().sum()) == pytest.approx(2.0, abs=1e-12)
    if isinstance(model, TauResNet):  # every block but the input and the projected last
        assert model.prune(0.99) == [1, 2]


class _Loss(torch.nn.Module):
    def __init__(
        self, model: TauNetwork, x: torch.Tensor, y: torch.Tensor, l1: float, horizon: float
    ) -> None:
        super().__init__()
        self.model, self.x, self.y, self.l1, self.horizon = model, x, y, l1, horizon

    def forward(self) -> torch.Tensor:
        taus = self.model.taus
        loss = F.cross_entropy(reference_forward(self.model, self.x), self.y)
        return loss + self.l1 * taus.abs().sum() + self.horizon * (taus.sum() - self.model.T) ** 2


def test_pruning_rules_by_hand() -> None:
    """taus (1, 0.004, 0.002, 0.994): shares 0.2 %, 0.1 % of sum|tau| = 2 fall under 1 %."""
    for rule, removed in (("all", [1, 2]), ("smallest", [2])):
        model = TauResNet(4, 3, 4, 2)
        with torch.no_grad():
            model.tau_free.copy_(torch.tensor([1.0, 0.004, 0.002, 0.994]))
        assert model.prune(0.01, rule) == removed
    with pytest.raises(ValueError, match="rule must be one of"):
        TauResNet(4, 3, 4, 2).prune(0.01, "largest")
    with pytest.raises(ValueError, match="choose one of"):
        TauResNet(4, 3, 4, 2, dependent_last_tau=True, projected_last_tau=True)
