"""Trials in progress, saved: each running trial's latest state as a file in the artifact
folder, so that a trial stopped anywhere goes on from there on any worker that sees the folder.

A trial and its retries share a run key (a trial attribute that a retry inherits); the file
``<artifact folder>/checkpoints/<run key>.pt`` holds its latest state, replaced atomically at
every save and deleted when the trial ends. Besides the state (``tauopt.engine.RunState``) it
holds who it belongs to: the study, the run key, the first attempt's number, a hash of the
training config and of the dataset, and the format. A state that does not match all of them,
or that cannot be read or restored, is never used: the trial starts from epoch 0 and the
worker says why in one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tauopt.engine import RawDataset, RunState, TrainConfig, check_state

#: The files' format; one of another format is not read (the trial starts again).
FORMAT = 1
KIND = "tauopt trial state"
#: The folder of the states, inside the artifact folder.
FOLDER = "checkpoints"
_RUN_KEY = re.compile(r"[0-9a-f]{32}")


def new_run_key() -> str:
    """A run key for a trial's first attempt (its retries inherit it)."""
    return uuid.uuid4().hex


def valid_run_key(key: object) -> bool:
    return isinstance(key, str) and _RUN_KEY.fullmatch(key) is not None


def dataset_hash(dataset: RawDataset) -> str:
    """The content of a dataset as loaded: a user's file's hash, or one of the named dataset's
    images and labels (a worker whose copy differs does not go on from another's state)."""
    if dataset.sha256:
        return dataset.sha256
    digest = hashlib.sha256(dataset.name.encode())
    for part in (dataset.train, dataset.test):
        for tensor in (part.images, part.labels):
            digest.update(tensor.contiguous().numpy().data)
    return digest.hexdigest()


def config_hash(config: TrainConfig, dataset_sha256: str, test_every_epoch: bool) -> str:
    """What a run's result depends on, besides the machine: its config, its data, and whether
    it measures the test accuracy after every epoch."""
    text = json.dumps(
        {"config": config.to_dict(), "dataset": dataset_sha256, "test": test_every_epoch},
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class TrialIdentity:
    """Whose state a file holds: the study, the run key, the first attempt's number (a grid
    run's or searched trial's retries keep it) and the hash of :func:`config_hash`."""

    study: str
    run_key: str
    first_number: int
    config_hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "run_key": self.run_key,
            "first_number": self.first_number,
            "config_hash": self.config_hash,
        }


def where(point: tuple[int, int]) -> str:
    epoch, batch = point
    return f"epoch {epoch}" + (f", batch {batch} of the next" if batch else "")


class TrialStates:
    """The saved states of running trials in ``folder``; ``say`` prints what a worker must not
    keep quiet (one line per state it cannot use; once, that it cannot save)."""

    def __init__(self, folder: Path, say: Callable[[str], None]) -> None:
        self.folder, self.say = folder, say
        self._cannot_save = False

    def path(self, run_key: str) -> Path:
        if not valid_run_key(run_key):  # a file name: nothing else may reach the file system
            raise ValueError(f"invalid run key {run_key!r}")
        return self.folder / f"{run_key}.pt"

    def save(self, identity: TrialIdentity, state: RunState) -> bool:
        """Replace the trial's state by ``state``, atomically (a temporary file beside it,
        flushed to disk, renamed into place). A folder that cannot be written is said once per
        worker; the trial trains on without. Whether the state was saved."""
        target = self.path(identity.run_key)
        partial = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
        data = {"kind": KIND, "format": FORMAT, **identity.as_dict(), "state": state.to_dict()}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with open(partial, "wb") as fh:
                torch.save(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(partial, target)
        except OSError as e:
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
            if not self._cannot_save:
                self._cannot_save = True
                self.say(
                    f"cannot save the states of running trials to {self.folder} "
                    f"({e.strerror or e}); trials train on without them, and a trial stopped "
                    "starts again from epoch 0"
                )
            return False
        return True

    def delete(self, run_key: str) -> None:
        """The trial ended: its state goes (a failure is no matter: nobody reads it again)."""
        with contextlib.suppress(OSError, ValueError):
            self.path(run_key).unlink(missing_ok=True)

    def load(
        self,
        identity: TrialIdentity,
        config: TrainConfig,
        shape: tuple[int, int],
        *,
        label: str,
        saved_at: tuple[int, int] | None,
    ) -> RunState | None:
        """The trial's saved state, checked to be its own and usable, or None. ``saved_at`` is
        where the trial's record says its last state stood (None: never saved): a state
        expected and missing is said, as is every state that cannot be used."""
        path = self.path(identity.run_key)
        state, why = self._read(path, identity, config, shape)
        if state is not None:
            return state
        if why is None:
            if saved_at is not None:
                self.say(
                    f"{label} starts again from epoch 0: its state after {where(saved_at)} is "
                    f"not in {self.folder} (saved by a worker with another artifact folder?)"
                )
            return None
        self.say(f"{label} starts again from epoch 0: its saved state {path} {why}")
        return None

    def _read(
        self, path: Path, identity: TrialIdentity, config: TrainConfig, shape: tuple[int, int]
    ) -> tuple[RunState | None, str | None]:
        """The state in ``path`` or why it cannot be used (both None: there is none)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            return None, None
        except Exception as e:  # pickle, EOF, zip, runtime errors of a damaged file
            return None, f"is damaged ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        if not isinstance(data, dict) or data.get("kind") != KIND:
            return None, "is not a tauopt trial state"
        if data.get("format") != FORMAT:
            return None, (
                f"has format {data.get('format')!r}; this version of tauopt reads format {FORMAT}"
            )
        mine = identity.as_dict()
        if any(data.get(key) != mine[key] for key in ("study", "run_key", "first_number")):
            return None, (
                f"belongs to another trial (study {data.get('study')!r}, trial "
                f"{data.get('first_number')!r})"
            )
        if data.get("config_hash") != identity.config_hash:
            return None, "was saved for another config or dataset"
        try:
            state = RunState.from_dict(data["state"])
            if state.config != config:
                return None, "was saved for another config"
            check_state(state, *shape)
        except Exception as e:  # whatever a damaged or incomplete state raises
            return None, f"is incomplete or damaged ({type(e).__name__}: {str(e)[:160]})"
        return state, None
