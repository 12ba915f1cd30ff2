"""The training engine on real data subsets: constraints, pruning, determinism, failures."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from tauopt.engine import (
    EpochStats,
    RawDataset,
    RunStoppedError,
    TrainConfig,
    build_model,
    load_dataset,
    train,
)
from tauopt.errors import ConfigError, DataError, DivergedError

SMALL = {"train_size": 2000, "val_size": 2000, "lr": 0.3, "device": "cpu"}


def _config(**changes: object) -> TrainConfig:
    base = {k: v for k, v in SMALL.items() if k != "device"}
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_resnet_learns_mnist_subset(mnist: RawDataset) -> None:
    result = train(_config(epochs=3), mnist, device="cpu")
    assert result.history.val_accuracy[-1] > 0.75
    assert result.test_accuracy > 0.75
    assert len(result.history.taus) == 3 and len(result.history.epoch_seconds) == 3


def test_fracdnn_learns_fashion_subset(fashion: RawDataset) -> None:
    result = train(
        _config(arch="fracdnn", dataset="fashion-mnist", epochs=3, T=2.0), fashion, device="cpu"
    )
    assert result.test_accuracy > 0.5
    assert min(result.taus) >= 1e-4 - 1e-9


def test_same_seed_same_result(mnist: RawDataset) -> None:
    a = train(_config(epochs=1, train_size=500, arch="fracdnn"), mnist, device="cpu")
    b = train(_config(epochs=1, train_size=500, arch="fracdnn"), mnist, device="cpu")
    assert a.taus == b.taus and a.history.val_accuracy == b.history.val_accuracy
    c = train(_config(epochs=1, train_size=500, arch="fracdnn", seed=1), mnist, device="cpu")
    assert c.taus != a.taus


def test_data_seed_orders_the_batches_and_seed_the_weights(mnist: RawDataset) -> None:
    base = _config(epochs=1, train_size=500, seed=3)
    alone = train(base, mnist, device="cpu")
    assert train(base.replace(data_seed=3), mnist, device="cpu").taus == alone.taus
    assert train(base.replace(data_seed=4), mnist, device="cpu").taus != alone.taus
    first = build_model(base.replace(data_seed=4), 784, 10)
    assert torch.equal(first.blocks[0].weight, build_model(base, 784, 10).blocks[0].weight)


@pytest.mark.parametrize("arch", ["resnet", "fracdnn"])
def test_dependent_last_tau_keeps_the_horizon(mnist: RawDataset, arch: str) -> None:
    result = train(
        _config(arch=arch, epochs=3, T=3.0, dependent_last_tau=True, l1=0.05), mnist, device="cpu"
    )
    for taus in result.history.taus:
        assert sum(taus) == pytest.approx(3.0, abs=1e-6)
    assert result.taus != pytest.approx([0.5] * 6)  # the taus did move


def test_horizon_penalty_pulls_the_sum_towards_T(mnist: RawDataset) -> None:
    # lr * 12 * horizon_weight < 2 keeps the penalty's gradient step stable for 6 taus.
    free = train(_config(epochs=2, l1=0.5, lr=0.1), mnist, device="cpu")
    held = train(_config(epochs=2, l1=0.5, lr=0.1, horizon_weight=1.0), mnist, device="cpu")
    assert abs(sum(free.taus) - 1.0) > 0.05
    assert abs(sum(held.taus) - 1.0) < abs(sum(free.taus) - 1.0) / 3


def test_l1_penalty_shrinks_taus(mnist: RawDataset) -> None:
    plain = train(_config(epochs=2), mnist, device="cpu")
    sparse = train(_config(epochs=2, l1=0.5), mnist, device="cpu")
    assert sum(abs(t) for t in sparse.taus) < sum(abs(t) for t in plain.taus)


def test_pruning_shrinks_the_network_and_training_goes_on(mnist: RawDataset) -> None:
    result = train(_config(epochs=4, l1=0.3, prune_eps=0.12), mnist, device="cpu")
    assert result.history.pruned, "expected the l1 penalty to drive some taus below eps"
    assert result.active_blocks == 6 - len(result.history.pruned) == len(result.taus)
    assert 0 in result.active_block_ids
    last_epoch = max(e.epoch for e in result.history.pruned)
    for event in result.history.pruned:
        assert result.history.taus[-1][event.block] == 0.0 or event.epoch == result.config.epochs
    assert result.active_params < 784 * 100 + 100 + 5 * (100 * 100 + 100) + 1000 + 6
    assert result.model.depth == result.active_blocks
    if last_epoch < result.config.epochs:
        assert all(loss == loss for loss in result.history.train_loss)


def test_fixed_tau_keeps_taus(mnist: RawDataset) -> None:
    result = train(_config(epochs=1, fixed_tau=True, l1=1.0), mnist, device="cpu")
    assert result.taus == pytest.approx([1 / 6] * 6)


def test_divergence_is_reported(mnist: RawDataset) -> None:
    with pytest.raises(DivergedError, match="diverged in epoch 1"):
        train(_config(epochs=2, lr=1e6, T=50.0), mnist, device="cpu")


def test_on_epoch_sees_every_epoch(mnist: RawDataset) -> None:
    seen: list[int] = []
    train(
        _config(epochs=2, train_size=300),
        mnist,
        device="cpu",
        on_epoch=lambda s: seen.append(s.epoch),
    )
    assert seen == [1, 2]


def test_a_run_its_caller_stops_raises_with_what_it_trained(mnist: RawDataset) -> None:
    class StopError(Exception):
        pass

    def stop_after_two(stats: EpochStats) -> None:
        if stats.epoch == 2:
            raise StopError("enough")

    with pytest.raises(RunStoppedError, match="after epoch 2: enough") as stopped:
        train(_config(epochs=4, train_size=300), mnist, device="cpu", on_epoch=stop_after_two)
    assert isinstance(stopped.value.cause, StopError) and stopped.value.epoch == 2
    partial = stopped.value.result
    assert len(partial.history.train_loss) == len(partial.history.val_accuracy) == 2
    assert 0.0 <= partial.test_accuracy <= 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "vgg"}, "arch must be one of"),
        ({"epochs": 0}, "epochs must be an integer in \\[1, 1000000\\]"),
        ({"prune_eps": 0.1, "arch": "fracdnn"}, "prune_eps applies to arch 'resnet' only"),
        ({"l1": -1.0}, "l1 must be a number >= 0"),
        ({"dataset": "cifar"}, "dataset must be one of"),
        ({"gamma": 0.0}, "gamma"),
        ({"data_seed": 1.5}, "data_seed must be an integer >= 0"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_unavailable_cuda_is_a_clear_error(mnist: RawDataset) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(_config(epochs=1), mnist, device="cuda")


def test_train_size_beyond_split_is_rejected(mnist: RawDataset) -> None:
    with pytest.raises(DataError, match="train_size must lie in"):
        train(_config(train_size=59_000), mnist, device="cpu")


# --- data files ------------------------------------------------------------------------------


def test_plain_and_gzip_idx_read_alike(tmp_path: Path, data_dir: Path, mnist: RawDataset) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (data_dir / "MNIST" / "raw").glob("*.gz"):
        with gzip.open(gz, "rb") as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    plain = load_dataset("mnist", tmp_path, download=False)
    assert torch.equal(plain.train.images, mnist.train.images)
    assert torch.equal(plain.test.labels, mnist.test.labels)
    assert mnist.train.images.shape == (60_000, 784) and len(mnist.test) == 10_000


def test_missing_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "FashionMNIST" / "raw")):
        load_dataset("fashion-mnist", tmp_path, download=False)


def test_corrupt_file_is_named(tmp_path: Path, data_dir: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(data_dir / "MNIST" / "raw", raw)
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(b"\x00\x00\x08\x01\x00\x00\x27\x10abc")
    )
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\.gz is truncated or corrupt"):
        load_dataset("mnist", tmp_path, download=False)


def test_plain_sgd_is_torch_sgd() -> None:
    from tauopt.engine._train import make_optimizer
    from tauopt.models import TauResNet

    torch.manual_seed(0)
    ours, theirs = TauResNet(6, 4, 3, 2), TauResNet(6, 4, 3, 2)
    theirs.load_state_dict(ours.state_dict())
    x, y = torch.rand(5, 6), torch.randint(0, 2, (5,))
    sgd = torch.optim.SGD(theirs.parameters(), lr=0.1)
    for _ in range(3):
        ours.loss_and_grad(x, y, l1=0.1)
        make_optimizer(ours, TrainConfig(lr=0.1)).step()
        sgd.zero_grad()
        loss = torch.nn.functional.cross_entropy(theirs(x), y) + 0.1 * theirs.taus.abs().sum()
        loss.backward()
        sgd.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "changes",
    [{}, {"width": 7, "depth": 3}, {"dependent_last_tau": True}, {"arch": "fracdnn", "depth": 4}],
)
def test_parameter_count_is_the_built_networks(changes: dict[str, object]) -> None:
    from tauopt.engine import build_model, parameter_count

    config = TrainConfig(**changes)  # type: ignore[arg-type]
    built = build_model(config, 784, 10).num_active_params()
    assert parameter_count(config, 784, 10) == built


def test_every_epoch_records_training_accuracy_clean_loss_and_penalties(
    mnist: RawDataset,
) -> None:
    config = _config(epochs=2, train_size=1200, l1=0.05, horizon_weight=0.2, T=2.0)
    result = train(config, mnist, device="cpu")
    assert (
        len(result.history.train_accuracy)
        == len(result.history.clean_loss)
        == len(result.history.penalties)
        == 2
    )
    assert all(0.1 < a <= 1.0 for a in result.history.train_accuracy)
    for total, clean, terms, taus in zip(
        result.history.train_loss,
        result.history.clean_loss,
        result.history.penalties,
        result.history.taus,
        strict=True,
    ):
        assert clean < total  # the penalties are positive
        assert terms["l1"] == pytest.approx(0.05 * sum(abs(t) for t in taus))
        assert terms["horizon"] == pytest.approx(0.2 * (sum(taus) - 2.0) ** 2)


def test_without_validation_images_the_run_records_none(mnist: RawDataset) -> None:
    result = train(_config(epochs=1, train_size=500, val_size=0), mnist, device="cpu")
    assert (
        result.history.val_accuracy == [] and result.final_val_accuracy != result.final_val_accuracy
    )
    assert len(result.history.train_accuracy) == 1


def test_the_papers_pruning_removes_at_most_one_block_per_epoch(mnist: RawDataset) -> None:
    both = {"epochs": 3, "l1": 0.3, "prune_eps": 0.12}
    every = train(_config(**both), mnist, device="cpu")
    one = train(_config(**both, prune_rule="smallest"), mnist, device="cpu")
    per_epoch = [sum(e.epoch == k for e in one.history.pruned) for k in (1, 2, 3)]
    assert max(per_epoch) == 1 and one.history.pruned
    assert max(sum(e.epoch == k for e in every.history.pruned) for k in (1, 2, 3)) > 1


def test_projected_last_tau_keeps_the_horizon_exactly(mnist: RawDataset) -> None:
    result = train(_config(epochs=1, T=3.0, projected_last_tau=True), mnist, device="cpu")
    assert sum(result.taus) == pytest.approx(3.0, abs=1e-5)
