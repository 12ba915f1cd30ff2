"""A trained (possibly pruned) network as a file, and back."""

from __future__ import annotations

from pathlib import Path

import torch

from tauopt.engine import TrainConfig, TrainResult, build_model
from tauopt.models import TauNetwork
from tauopt.storage import StorageError

_FORMAT = 1


def save_checkpoint(result: TrainResult, in_features: int, num_classes: int, path: Path) -> None:
    """Config, surviving block ids and weights: enough to rebuild the pruned network."""
    torch.save(
        {
            "format": _FORMAT,
            "config": result.config.to_dict(),
            "in_features": in_features,
            "num_classes": num_classes,
            "active_block_ids": list(result.model.block_ids),
            "state_dict": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
        },
        path,
    )


def load_checkpoint(path: Path, label: str | None = None) -> TauNetwork:
    """The network saved by :func:`save_checkpoint`, on the CPU, in eval mode."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, EOF, zip and runtime errors for a bad file
        raise StorageError(
            f"{label or path} is damaged or not a model file ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); rerun the trial or restore the file"
        ) from e
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise StorageError(f"{label or path} is not a tauopt checkpoint (format {_FORMAT})")
    try:
        config = TrainConfig(**data["config"])
        model = build_model(config, data["in_features"], data["num_classes"])
        ids = data["active_block_ids"]
        if ids != list(range(config.depth)):
            model.keep_blocks(ids)  # the full model's positions are the original ids
        model.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise StorageError(f"{label or path} does not hold a complete tauopt model: {e}") from e
    model.eval()
    return model
