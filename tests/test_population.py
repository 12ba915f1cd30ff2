"""Population training: members of a batched group give what each config gives alone."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tauopt.engine import (
    EpochStats,
    RawDataset,
    RunStoppedError,
    TrainConfig,
    TrainResult,
    group_key,
    train,
    train_population,
)
from tauopt.errors import ConfigError, DivergedError
from tauopt.models import FractionalDNN, TauNetwork, TauPopulation, TauResNet

SMALL: dict[str, Any] = {"epochs": 3, "train_size": 1500, "val_size": 1000, "data_seed": 7}


def _networks(cls: type[TauNetwork], **kw: Any) -> list[TauNetwork]:
    """Three networks; with ``mixed``, the second one's last tau is T minus the others."""
    nets = []
    mixed = kw.pop("mixed", False)
    for i, T in enumerate((1.0, 2.5, 0.7)):
        torch.manual_seed(i)
        extra = {"gamma": 0.2 + 0.3 * i, "tau_min": 1e-3 * (i + 1)} if cls is FractionalDNN else {}
        if mixed and i == 1:
            extra["dependent_last_tau"] = True
        nets.append(cls(12, 7, 4, 3, T=T, **extra, **kw).double())
    return nets


KINDS = [
    (TauResNet, {}),
    (TauResNet, {"dependent_last_tau": True}),
    (TauResNet, {"mixed": True}),
    (FractionalDNN, {}),
    (FractionalDNN, {"dependent_last_tau": True}),
    (FractionalDNN, {"mixed": True}),
    (FractionalDNN, {"detach_memory": True}),
    (TauResNet, {"projected_last_tau": True}),
    (FractionalDNN, {"projected_last_tau": True}),
]


@pytest.mark.parametrize(("cls", "kw"), KINDS)
def test_losses_and_gradients_equal_each_networks_own(cls: type[TauNetwork], kw: Any) -> None:
    nets = _networks(cls, **kw)
    pop = TauPopulation(nets)
    x, y = torch.rand(5, 12, dtype=torch.float64), torch.randint(0, 3, (5,))
    l1 = torch.tensor([0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.tensor([0.2, 0.0, 0.05], dtype=torch.float64)
    losses = pop.losses(x, y, l1, horizon)
    params = [pop.w0, pop.w_hidden, pop.bias, pop.w_out, pop.tau_free]
    grads = torch.autograd.grad(losses.sum(), params)
    for k, net in enumerate(nets):
        loss = net.loss_and_grad(x, y, l1=float(l1[k]), horizon_weight=float(horizon[k]))
        assert float(losses[k].detach()) == pytest.approx(float(loss), rel=1e-12)
        blocks = [b for b in net.blocks if isinstance(b, torch.nn.Linear)]
        expected = [
            blocks[0].weight.grad,
            torch.stack([b.weight.grad for b in blocks[1:]]),
            torch.stack([b.bias.grad for b in blocks]),
            net.output.weight.grad,
            net.tau_free.grad,
        ]
        for got, want in zip(grads, expected, strict=True):
            mine = got[k]
            if got is grads[-1]:  # a dependent last tau's column is never read: no gradient
                mine, unused = got[k][: want.numel()], got[k][want.numel() :]
                assert not unused.any()
                if net.projected_last_tau:  # overwritten after the step: the step drops it
                    assert float(want[-1]) == 0.0
                    mine, want = mine[:-1], want[:-1]
            torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("cls", "kw"), KINDS)
def test_an_sgd_step_equals_each_networks_own(cls: type[TauNetwork], kw: Any) -> None:
    """The fused step (hand-written products, closed-form tau gradients) moves every
    member as its own network's gradient and plain SGD would, with a pruned block masked."""
    nets = _networks(cls, **kw)
    pop = TauPopulation(nets)
    if cls is TauResNet:
        with torch.no_grad():
            pop.tau_free[1, 1] = 1e-9
        assert pop.prune(1, 0.01) == [1]
        nets[1].keep_blocks([0, 2, 3])
    x, y = torch.rand(6, 12, dtype=torch.float64), torch.randint(0, 3, (6,))
    lr = torch.tensor([0.1, 0.05, 0.2], dtype=torch.float64)
    l1 = torch.tensor([0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.tensor([0.2, 0.0, 0.05], dtype=torch.float64)
    losses = pop.sgd_step_(x, y, lr=lr, l1=l1, horizon_weight=horizon)
    for k, net in enumerate(nets):
        loss = net.loss_and_grad(x, y, l1=float(l1[k]), horizon_weight=float(horizon[k]))
        with torch.no_grad():
            for param in net.parameters():
                if param.grad is not None:
                    param -= float(lr[k]) * param.grad
        net.project_taus_()
        assert float(losses[k]) == pytest.approx(float(loss), rel=1e-12)
        fresh = type(net)(12, 7, 4, 3, T=net.T, **_same_kind(net, kw)).double()
        mine = pop.export(k, fresh)
        for (name, got), want in zip(
            mine.state_dict().items(), net.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)


def _side_by_side(
    pop: TauPopulation,
    nets: list[TauNetwork],
    steps: int,
    *,
    lr: torch.Tensor,
    l1: torch.Tensor,
    horizon: torch.Tensor,
) -> None:
    """``steps`` SGD steps of the population and of each network alone, on the same batches."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.rand(6, 12, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 3, (6,), generator=gen)
        pop.sgd_step_(x, y, lr=lr, l1=l1, horizon_weight=horizon)
        for k, net in enumerate(nets):
            net.loss_and_grad(x, y, l1=float(l1[k]), horizon_weight=float(horizon[k]))
            with torch.no_grad():
                for param in net.parameters():
                    if param.grad is not None:
                        param -= float(lr[k]) * param.grad
            net.project_taus_()


@pytest.mark.parametrize(
    ("cls", "kw"), [(TauResNet, {"mixed": True}), (FractionalDNN, {"mixed": True})]
)
def test_many_steps_in_float64_stay_equal_to_each_networks_own(
    cls: type[TauNetwork], kw: Any
) -> None:
    nets = _networks(cls, **kw)
    pop = TauPopulation(_networks(cls, **kw))
    lr = torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64)
    l1 = torch.tensor([0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.tensor([0.2, 0.0, 0.05], dtype=torch.float64)
    _side_by_side(pop, nets, 40, lr=lr, l1=l1, horizon=horizon)
    for k, net in enumerate(nets):
        fresh = type(net)(12, 7, 4, 3, T=net.T, **_same_kind(net, kw)).double()
        for got, want in zip(
            pop.export(k, fresh).state_dict().values(), net.state_dict().values(), strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def _same_kind(net: TauNetwork, kw: Any) -> dict[str, Any]:
    same = {k: v for k, v in kw.items() if k != "mixed"}
    same["dependent_last_tau"] = net.dependent_last_tau
    same["projected_last_tau"] = net.projected_last_tau
    if isinstance(net, FractionalDNN):
        return {**same, "gamma": net.gamma, "tau_min": net.tau_min}
    return same


# detach_memory drops the memory's dependence on the taus on purpose, and a projected last tau
# its gradient: no exact gradient there.
EXACT = [k for k in KINDS if "detach_memory" not in k[1] and "projected_last_tau" not in k[1]]


@pytest.mark.parametrize(("cls", "kw"), EXACT)
def test_gradcheck_with_respect_to_the_taus(cls: type[TauNetwork], kw: Any) -> None:
    pop = TauPopulation(_networks(cls, **kw))
    x, y = torch.rand(4, 12, dtype=torch.float64), torch.randint(0, 3, (4,))
    l1 = torch.tensor([0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.tensor([0.2, 0.0, 0.05], dtype=torch.float64)

    class Losses(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pop = pop

        def forward(self) -> torch.Tensor:
            return self.pop.losses(x, y, l1, horizon)

    def losses(taus: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(Losses(), {"pop.tau_free": taus}, ())
        return out

    taus = pop.tau_free.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(losses, (taus,))


def test_repacking_moves_every_members_blocks_into_the_fewest_slots() -> None:
    nets = _networks(TauResNet)
    pop = TauPopulation(nets)
    with torch.no_grad():
        pop.tau_free[:, 2] = 1e-6  # block 2 negligible in every member
        pop.tau_free[0, 1] = 1e-6  # block 1 only in the first
    for member in range(3):
        pop.prune(member, 0.01)
    assert pop.active.tolist() == [[True, False, False, True]] + [[True, True, False, True]] * 2
    x = torch.rand(5, 12, dtype=torch.float64)
    before = pop(x).detach()
    pop.keep([0, 1, 2])
    # as deep as the member with the most blocks; the first one's two fill slots 0 and 1
    assert pop.depth == 3 and pop.block_ids == [[0, 3, -1], [0, 1, 3], [0, 1, 3]]
    assert pop.active.tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    assert not pop.bias[0, 2].any() and not pop.w_hidden[0, 1].any()  # an empty block
    torch.testing.assert_close(pop(x), before, rtol=0, atol=0)  # an exact identity map
    pop.keep([1])
    assert pop.size == 1 and pop.block_ids == [[0, 1, 3]]
    torch.testing.assert_close(pop(x)[0], before[1])
    pop.keep([0])
    assert pop.depth == 3  # a member's own blocks stay


def test_repacked_members_with_different_pruning_train_as_each_alone() -> None:
    """Each member pruned its own blocks (the second's last tau is T minus the others, so its
    last block moves to the last slot): after repacking, many steps equal each network's."""
    nets, pop = _networks(TauResNet, mixed=True), TauPopulation(_networks(TauResNet, mixed=True))
    with torch.no_grad():
        pop.tau_free[0, 2] = 1e-9
        pop.tau_free[1, 1] = 1e-9
        pop.tau_free[2, 1:3] = 1e-9
    assert [pop.prune(k, 0.01) for k in range(3)] == [[2], [1], [1, 2]]
    for net, kept in zip(nets, ([0, 1, 3], [0, 2, 3], [0, 3]), strict=True):
        net.keep_blocks(kept)
    pop.keep([0, 1, 2])
    assert pop.depth == 3 and pop.block_ids == [[0, 1, 3], [0, 2, 3], [0, 3, -1]]
    lr = torch.tensor([0.3, 0.1, 0.5], dtype=torch.float64)
    l1 = torch.tensor([0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.tensor([0.2, 0.05, 0.05], dtype=torch.float64)
    _side_by_side(pop, nets, 30, lr=lr, l1=l1, horizon=horizon)
    for k, net in enumerate(nets):
        assert pop.member_block_ids(k) == net.block_ids
        fresh = TauResNet(12, 7, 4, 3, T=net.T, dependent_last_tau=net.dependent_last_tau)
        mine = pop.export(k, fresh.double())
        for got, want in zip(mine.state_dict().values(), net.state_dict().values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not pop.tau_free[2, 2] and not pop.bias[2, 2].any()  # the empty slot stays empty
    with pytest.raises(ValueError, match="cannot be pruned"):
        TauPopulation(_networks(FractionalDNN)).prune(0, 0.5)


def test_a_population_needs_one_shape() -> None:
    with pytest.raises(ValueError, match="share one shape"):
        TauPopulation([TauResNet(12, 7, 4, 3), TauResNet(12, 7, 5, 3)])
    with pytest.raises(ValueError, match="share one shape"):
        TauPopulation([TauResNet(12, 7, 4, 3), FractionalDNN(12, 8, 4, 3)])


def _mixed_networks() -> list[TauNetwork]:
    """ResNets and fractional networks in one group, dependent last taus on both sides."""
    nets: list[TauNetwork] = []
    for i, (cls, dependent) in enumerate(
        [(TauResNet, False), (FractionalDNN, True), (TauResNet, True), (FractionalDNN, False)]
    ):
        torch.manual_seed(i)
        extra = {"gamma": 0.3 + 0.2 * i, "tau_min": 1e-3} if cls is FractionalDNN else {}
        net = cls(12, 7, 4, 3, T=0.8 + i, dependent_last_tau=dependent, **extra)
        nets.append(net.double())
    return nets


def test_resnets_and_fractional_networks_step_together_as_each_alone() -> None:
    nets, pop = _mixed_networks(), TauPopulation(_mixed_networks())
    with torch.no_grad():
        pop.tau_free[0, 2] = 1e-9
    assert pop.prune(0, 0.01) == [2]  # a pruned ResNet block beside fractional members
    nets[0].keep_blocks([0, 1, 3])
    lr = torch.tensor([0.3, 0.1, 0.2, 0.4], dtype=torch.float64)
    l1 = torch.tensor([0.01, 0.0, 0.02, 0.01], dtype=torch.float64)
    horizon = torch.tensor([0.0, 0.1, 0.05, 0.0], dtype=torch.float64)
    _side_by_side(pop, nets, 20, lr=lr, l1=l1, horizon=horizon)
    fresh = _mixed_networks()
    for k, net in enumerate(nets):
        mine = pop.export(k, fresh[k])
        for got, want in zip(mine.state_dict().values(), net.state_dict().values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="cannot be pruned"):
        pop.prune(1, 0.5)


def test_fixed_partly_fixed_and_trainable_taus_step_together_as_each_alone() -> None:
    """Which taus train is a member's own: every tau fixed, only the input block's fixed
    (the papers' code's "fixed" ResNet) and all trainable share one population."""

    def networks() -> list[TauNetwork]:
        nets: list[TauNetwork] = []
        kinds: list[tuple[type[TauNetwork], dict[str, Any]]] = [
            (TauResNet, {"trainable_tau": False}),
            (TauResNet, {"fixed_input_tau": True}),
            (TauResNet, {}),
            (FractionalDNN, {"fixed_input_tau": True, "dependent_last_tau": True}),
            (FractionalDNN, {"trainable_tau": False}),
        ]
        for i, (cls, kw) in enumerate(kinds):
            torch.manual_seed(i)
            nets.append(cls(12, 7, 4, 3, T=1.0 + i, **kw).double())
        return nets

    nets, pop = networks(), TauPopulation(networks())
    lr = torch.tensor([0.3, 0.1, 0.2, 0.4, 0.1], dtype=torch.float64)
    l1 = torch.tensor([0.05, 0.02, 0.0, 0.01, 0.03], dtype=torch.float64)
    horizon = torch.zeros(5, dtype=torch.float64)
    _side_by_side(pop, nets, 10, lr=lr, l1=l1, horizon=horizon)
    fresh = networks()
    for k, net in enumerate(nets):
        mine = pop.export(k, fresh[k])
        for got, want in zip(mine.state_dict().values(), net.state_dict().values(), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    taus = pop.taus()
    assert taus[0].tolist() == pytest.approx([0.25] * 4)  # every tau fixed
    assert float(taus[1, 0]) == 0.5 and float(taus[3, 0]) == 1.0  # the input taus fixed
    assert bool(taus[1, 1:].ne(0.5).all())  # the rest trained


def _assert_same(
    together: TrainResult | Exception,
    alone: TrainResult,
    *,
    rel: float = 5e-4,
    accuracy: float = 2e-3,
) -> None:
    assert isinstance(together, TrainResult), together
    assert together.history.val_accuracy == pytest.approx(alone.history.val_accuracy, abs=accuracy)
    assert together.test_accuracy == pytest.approx(alone.test_accuracy, abs=accuracy)
    assert together.history.train_loss == pytest.approx(alone.history.train_loss, rel=rel)
    assert together.taus == pytest.approx(alone.taus, rel=rel, abs=1e-6)
    assert together.history.pruned == alone.history.pruned
    assert together.active_block_ids == alone.active_block_ids
    assert together.active_params == alone.active_params
    assert together.initial_params == alone.initial_params
    got, want = together.model.state_dict(), alone.model.state_dict()
    assert list(got) == list(want)
    for name in want:
        # float32 sums in another order drift apart step by step (in float64 the members stay
        # equal to 1e-15 over many steps: test_many_steps_in_float64...): compare whole tensors
        drift = float((got[name] - want[name]).norm() / want[name].norm().clamp(min=1e-12))
        assert drift < 10 * rel, (name, drift)


def test_resnets_with_pruning_and_mixed_hyperparameters_equal_training_alone(
    mnist: RawDataset,
) -> None:
    configs = [
        TrainConfig(seed=1, T=1.0, lr=0.05, l1=0.01, prune_eps=0.15, **SMALL),
        TrainConfig(seed=2, T=3.0, lr=0.1, horizon_weight=0.05, prune_eps=0.1, **SMALL),
        TrainConfig(seed=3, T=0.5, lr=0.02, **SMALL),
        TrainConfig(seed=4, T=2.0, lr=0.08, l1=0.005, prune_eps=0.12, **SMALL),
        TrainConfig(seed=5, T=2.0, lr=0.08, prune_eps=0.15, dependent_last_tau=True, **SMALL),
    ]
    results = train_population(configs, mnist, device="cpu")
    alone = [train(c, mnist, device="cpu") for c in configs]
    for together, single in zip(results, alone, strict=True):
        _assert_same(together, single)
    assert any(r.history.pruned for r in alone) and any(
        not r.history.pruned for r in alone
    )  # both kinds ran


def test_fractional_networks_with_mixed_orders_and_horizons_equal_training_alone(
    mnist: RawDataset,
) -> None:
    small = {**SMALL, "arch": "fracdnn"}
    configs = [
        TrainConfig(seed=1, T=1.0, gamma=0.3, lr=0.05, dependent_last_tau=True, **small),
        TrainConfig(seed=2, T=4.0, gamma=0.8, lr=0.1, l1=0.01, tau_min=1e-3, **small),
        TrainConfig(seed=3, T=0.6, gamma=0.5, lr=0.02, horizon_weight=0.1, **small),
        TrainConfig(seed=4, T=2.0, gamma=0.2, lr=0.08, **small),
    ]
    results = train_population(configs, mnist, device="cpu")
    for config, together in zip(configs, results, strict=True):
        _assert_same(together, train(config, mnist, device="cpu"))


def test_a_diverging_member_fails_alone(mnist: RawDataset) -> None:
    configs = [
        TrainConfig(seed=1, T=1.0, lr=0.05, **SMALL),
        TrainConfig(seed=2, T=10.0, lr=1e6, **SMALL),  # blows up in its first epoch
        TrainConfig(seed=3, T=2.0, lr=0.1, prune_eps=0.1, **SMALL),
        TrainConfig(seed=4, T=0.5, lr=0.2, **SMALL),
    ]
    results = train_population(configs, mnist, device="cpu")
    with pytest.raises(DivergedError) as alone_error:
        train(configs[1], mnist, device="cpu")
    assert isinstance(results[1], DivergedError)
    assert str(results[1]) == str(alone_error.value)
    for i in (0, 2, 3):
        _assert_same(results[i], train(configs[i], mnist, device="cpu"))


def test_a_member_stopped_by_its_caller_leaves_and_the_rest_go_on(mnist: RawDataset) -> None:
    configs = [TrainConfig(seed=s, T=1.0 + s, lr=0.05, **SMALL) for s in range(4)]
    seen: list[tuple[int, int]] = []

    class StopError(Exception):
        pass

    def on_epoch(index: int, stats: EpochStats) -> None:
        seen.append((index, stats.epoch))
        if index == 1 and stats.epoch == 1:
            raise StopError()

    results = train_population(configs, mnist, device="cpu", on_epoch=on_epoch)
    stopped = results[1]
    assert isinstance(stopped, RunStoppedError) and isinstance(stopped.cause, StopError)
    assert stopped.epoch == 1 and stopped.__cause__ is stopped.cause
    # what it trained up to the epoch that stopped it comes with it
    assert stopped.result.config == configs[1] and len(stopped.result.history.train_loss) == 1
    assert 0.0 <= stopped.result.test_accuracy <= 1.0
    assert seen == [(0, 1), (1, 1), (2, 1), (3, 1), (0, 2), (2, 2), (3, 2), (0, 3), (2, 3), (3, 3)]
    _assert_same(results[2], train(configs[2], mnist, device="cpu"))


def test_only_configs_of_one_group_train_together(mnist: RawDataset) -> None:
    a = TrainConfig(**SMALL)
    assert group_key(a) == group_key(a.replace(lr=0.3, T=5.0, l1=0.1, seed=9, prune_eps=0.1))
    assert group_key(a) == group_key(a.replace(arch="fracdnn", dependent_last_tau=True))
    assert group_key(a) != group_key(a.replace(width=50))
    assert group_key(a) != group_key(a.replace(data_seed=8))
    assert group_key(a) != group_key(a.replace(split_seed=8))
    assert group_key(a) == group_key(a.replace(fixed_tau=True))  # which taus train: per member
    assert group_key(a) == group_key(a.replace(fixed_input_tau=True))
    with pytest.raises(ConfigError, match="must agree on"):
        train_population([a, a.replace(depth=4)], mnist, device="cpu")


def _both_architectures(**extra: Any) -> list[TrainConfig]:
    """Two pruning ResNets and two fractional networks (two with a dependent last tau)."""
    small = {**SMALL, **extra}
    return [
        TrainConfig(seed=1, T=1.0, lr=0.05, l1=0.01, prune_eps=0.15, **small),
        TrainConfig(seed=2, arch="fracdnn", T=2.0, gamma=0.4, lr=0.05, **small),
        TrainConfig(seed=3, T=2.0, lr=0.1, dependent_last_tau=True, prune_eps=0.1, **small),
        TrainConfig(seed=4, arch="fracdnn", T=1.0, gamma=0.7, dependent_last_tau=True, **small),
    ]


def test_a_group_of_both_architectures_equals_training_alone(mnist: RawDataset) -> None:
    configs = _both_architectures()
    results = train_population(configs, mnist, device="cpu")
    for config, together in zip(configs, results, strict=True):
        _assert_same(together, train(config, mnist, device="cpu"))


def test_groups_of_both_architectures_train_together_and_small_groups_alone(
    mnist: RawDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    resnets = [TrainConfig(seed=s, lr=0.05 * (s + 1), **SMALL) for s in range(3)]
    fractional = TrainConfig(seed=9, arch="fracdnn", **SMALL)
    results = train_population([*resnets, fractional], mnist, device="cpu", progress=True)
    assert "epoch 3/3: 4 trials together, 4 go on" in capsys.readouterr().err
    _assert_same(results[3], train(fractional, mnist, device="cpu"))
    train_population(resnets, mnist, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "trials together" not in err  # three: each alone
    assert "(member 3 of 3, alone) epoch 3/3" in err


def test_pruning_resnets_and_fractional_networks_train_apart_and_the_stack_shrinks(
    mnist: RawDataset, capsys: pytest.CaptureFixture[str]
) -> None:
    """Four ResNets that prune and four fractional networks: two populations, and the
    ResNets' stack shrinks as its members prune (beside a fractional member it could not)."""
    eps = (0.3, 0.16, 0.2, 0.3)  # three keep the input block alone, one keeps four blocks
    resnets = [
        TrainConfig(seed=s, T=1.0 + s, lr=0.05, l1=0.01, prune_eps=eps[s], **SMALL)
        for s in range(4)
    ]
    small = {**SMALL, "arch": "fracdnn"}
    fractional = [TrainConfig(seed=s, T=1.0 + s, gamma=0.2 * s, **small) for s in range(1, 5)]
    configs = [c for pair in zip(resnets, fractional, strict=True) for c in pair]
    results = train_population(configs, mnist, device="cpu", progress=True, label="batch")
    err = capsys.readouterr().err
    assert "batch (resnet members) epoch 3/3: 4 trials together" in err
    assert "batch (fracdnn members) epoch 3/3: 4 trials together, 4 go on, best" in err
    assert "epoch 2/3: 4 trials together, 4 go on (stack of 4/6 blocks)" in err
    for config, together in zip(configs, results, strict=True):
        alone = train(config, mnist, device="cpu")
        _assert_same(together, alone)
    assert [len(r.active_block_ids) for r in results[::2] if isinstance(r, TrainResult)] == [
        1,
        4,
        1,
        1,
    ]


@pytest.mark.parametrize("cls", [TauResNet, FractionalDNN])
def test_a_bfloat16_step_rounds_the_products_operands_only(cls: type[TauNetwork]) -> None:
    """The parameters stay float32 and move as the float32 step moves them, to bfloat16's
    rounding of the products' operands (8 bits of mantissa: about 0.4 % per operand)."""
    nets = [n.float() for n in _networks(cls)]
    exact, rounded = TauPopulation(nets), TauPopulation(nets, products=torch.bfloat16)
    before = {name: p.detach().clone() for name, p in exact.named_parameters()}
    torch.manual_seed(0)
    x, y = torch.rand(16, 12), torch.randint(0, 3, (16,))
    lr, l1, horizon = torch.full((3,), 0.5), torch.full((3,), 0.01), torch.full((3,), 0.1)
    for pop in (exact, rounded):
        pop.sgd_step_(x, y, lr=lr, l1=l1, horizon_weight=horizon)
    for (name, want), got in zip(exact.named_parameters(), rounded.parameters(), strict=True):
        assert got.dtype == torch.float32, name
        moved = (want - before[name]).detach().norm()
        off = float((got - want).detach().norm() / moved)
        assert 1e-5 < off < 0.05, (name, off)  # rounded, and only as much as rounding does


def test_a_lone_run_in_bfloat16_is_a_population_of_one(mnist: RawDataset) -> None:
    """Members trained together in bfloat16 equal each trained alone in bfloat16, to the
    drift of sums in another order (larger than float32's: a rounded operand can round the
    other way); and a bfloat16 run lands near its float32 twin."""
    configs = _both_architectures(precision="bfloat16")
    results = train_population(configs, mnist, device="cpu")
    for config, together in zip(configs, results, strict=True):
        alone = train(config, mnist, device="cpu")
        _assert_same(together, alone, rel=5e-3, accuracy=1e-2)
        twin = train(config.replace(precision="float32"), mnist, device="cpu")
        assert alone.test_accuracy == pytest.approx(twin.test_accuracy, abs=0.01)
        assert alone.taus == pytest.approx(twin.taus, rel=1e-2)
