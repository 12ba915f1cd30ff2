"""The engine on a CUDA GPU: same step, same training, same CLI as on the CPU.

Skipped where no GPU is visible (as in CI); run on a GPU machine with ``pytest -m cuda``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tauopt._cli import main
from tauopt.engine import RawDataset, TrainConfig, build_model, make_splits, resolve_device, train
from tauopt.engine._step import GraphedTrainStep, TrainStep
from tauopt.engine._train import make_optimizer
from tauopt.models import FractionalDNN, TauNetwork, TauResNet

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SMALL = {"train_size": 2000, "val_size": 2000, "lr": 0.3}


@pytest.mark.parametrize(
    ("cls", "kw"),
    [
        (TauResNet, {}),
        (TauResNet, {"dependent_last_tau": True}),
        (FractionalDNN, {}),
        (FractionalDNN, {"dependent_last_tau": True, "gamma": 0.3}),
    ],
)
def test_step_on_gpu_matches_cpu_in_float64(cls: type[TauNetwork], kw: dict[str, object]) -> None:
    torch.manual_seed(3)
    cpu = cls(7, 5, 4, 3, T=2.0, **kw).double()  # type: ignore[arg-type]
    with torch.no_grad():
        cpu.tau_free.mul_(torch.linspace(0.6, 1.4, cpu.tau_free.numel(), dtype=torch.float64))
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.rand(8, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    for _ in range(2):  # the second step reuses the buffers of the first
        loss_cpu = cpu.loss_and_grad(x, y, l1=0.1, horizon_weight=0.5)
        loss_gpu = gpu.loss_and_grad(x.cuda(), y.cuda(), l1=0.1, horizon_weight=0.5)
        assert loss_gpu.device.type == "cuda"
        assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-12)
        for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
            if p_cpu.grad is None:
                assert p_gpu.grad is None, name
                continue
            assert p_gpu.grad is not None and p_gpu.grad.device.type == "cuda", name
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-10, atol=1e-12)
        with torch.no_grad():
            for p_cpu, p_gpu in zip(cpu.parameters(), gpu.parameters(), strict=True):
                if p_cpu.grad is not None and p_gpu.grad is not None:
                    p_cpu.sub_(0.1 * p_cpu.grad)
                    p_gpu.sub_(0.1 * p_gpu.grad)


@pytest.mark.parametrize("arch", ["resnet", "fracdnn"])
def test_training_on_gpu_follows_the_cpu(mnist: RawDataset, arch: str) -> None:
    """float32 on both; the GPU's products round differently, so the runs agree closely,
    not bit for bit."""
    config = TrainConfig(arch=arch, epochs=2, **SMALL)  # type: ignore[arg-type]
    on_cpu = train(config, mnist, device="cpu")
    on_gpu = train(config, mnist, device="cuda")
    assert on_gpu.device.startswith("cuda")
    assert next(on_gpu.model.parameters()).device.type == "cuda"
    assert on_gpu.history.val_accuracy[-1] > 0.6
    assert on_gpu.history.val_accuracy[-1] == pytest.approx(
        on_cpu.history.val_accuracy[-1], abs=0.01
    )
    assert on_gpu.taus == pytest.approx(on_cpu.taus, abs=1e-3)


def test_pruning_and_the_horizon_on_gpu(mnist: RawDataset) -> None:
    pruned = train(
        TrainConfig(epochs=4, l1=0.3, prune_eps=0.12, **SMALL),  # type: ignore[arg-type]
        mnist,
        device="cuda",
    )
    assert pruned.history.pruned and pruned.active_blocks < 6
    assert len(pruned.model.blocks) == pruned.active_blocks
    held = train(
        TrainConfig(  # type: ignore[arg-type]
            arch="fracdnn", epochs=2, T=3.0, dependent_last_tau=True, l1=0.05, **SMALL
        ),
        mnist,
        device="cuda",
    )
    for taus in held.history.taus:
        assert sum(taus) == pytest.approx(3.0, abs=1e-6)
    assert held.taus != pytest.approx([0.5] * 6)


def test_cuda_is_the_default_and_the_cli_uses_it(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert resolve_device(None).type == "cuda"
    args = ["train", "--data-dir", str(data_dir), "--epochs", "1", "--train-size", "500"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"].startswith("cuda")
    assert 0.0 <= out["test_accuracy"] <= 1.0


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(l1=0.1, horizon_weight=0.5),
        TrainConfig(arch="fracdnn", T=2.0, l1=0.1, horizon_weight=0.5),
        TrainConfig(arch="fracdnn", dependent_last_tau=True, gamma=0.3),
    ],
    ids=["resnet", "fracdnn", "fracdnn-dependent"],
)
def test_graph_replay_gives_the_eager_steps(mnist: RawDataset, config: TrainConfig) -> None:
    splits = make_splits(mnist, val_size=1000, train_size=1000, device=torch.device("cuda"))
    x, y = splits.train_x, splits.train_y
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(0)).cuda()
    models = [build_model(config, 784, 10).cuda() for _ in range(2)]
    steps = []
    for model, graphed in zip(models, (False, True), strict=True):
        kw = {"l1": config.l1, "horizon_weight": config.horizon_weight}
        opt = make_optimizer(model, config)
        step = (
            GraphedTrainStep(model, opt, x, y, batch_size=100, **kw)
            if graphed
            else TrainStep(model, opt, x, y, **kw)
        )
        for idx in order.split(100):
            step(idx)
        steps.append(step)
    eager, graphed_step = steps
    assert isinstance(graphed_step, GraphedTrainStep) and graphed_step.graph is not None
    assert graphed_step.total.item() == pytest.approx(eager.total.item(), rel=1e-5)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["resnet", "fracdnn"])
def test_training_with_and_without_graphs_agrees(mnist: RawDataset, arch: str) -> None:
    """A last batch of 50 (eager beside the graph) and pruning between epochs (a new graph)."""
    prune = {"prune_eps": 0.12} if arch == "resnet" else {}
    config = TrainConfig(  # type: ignore[arg-type]
        arch=arch, epochs=3, l1=0.3, **prune, **{**SMALL, "train_size": 2050}
    )
    graphed = train(config, mnist, device="cuda")
    eager = train(config, mnist, device="cuda", cuda_graphs=False)
    assert graphed.active_block_ids == eager.active_block_ids
    assert graphed.taus == pytest.approx(eager.taus, rel=1e-4, abs=1e-6)
    assert graphed.history.train_loss == pytest.approx(eager.history.train_loss, rel=1e-4)
    assert graphed.history.val_accuracy == pytest.approx(eager.history.val_accuracy, abs=0.002)
    if arch == "resnet":
        assert graphed.history.pruned, "the case is meant to prune between epochs"


def test_a_worker_training_many_runs_does_not_accumulate_gpu_memory(mnist: RawDataset) -> None:
    """Every epoch captures a graph with its own memory pool, and every stream a product runs
    on gets a cuBLAS workspace for good: a worker training trial after trial must level off
    (with a new stream per epoch it grew by 270 MB over these runs)."""
    config = TrainConfig(arch="fracdnn", epochs=3, **{**SMALL, "train_size": 1050})  # type: ignore[arg-type]
    reserved = []
    for _ in range(6):
        train(config, mnist, device="cuda")
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] <= reserved[1] + 16 * 2**20, reserved


def test_cli_without_graphs(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--data-dir", str(data_dir), "--epochs", "1", "--train-size", "500"]
    assert main([*args, "--arch", "fracdnn", "--no-cuda-graphs", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["device"].startswith("cuda") and len(out["taus"]) == 6
