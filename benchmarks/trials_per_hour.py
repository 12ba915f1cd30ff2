"""Whole-machine trials per hour: the study service against what a user would otherwise run.

Service: ``tauopt run`` (one worker at every core, the embedded SQLite storage) on the default
study, ``configs/study.toml`` (its search space and its trial size: 10 epochs on 50,000
images), with ``--batch-trials K`` for each K asked.

Baseline: ``optuna.create_study(directions=...).optimize(objective)`` with the same sampler,
where ``objective`` suggests the same search space and trains the way the papers' code does:
torchvision's MNIST through ``ToTensor`` and ``DataLoader(batch_size=100, shuffle=True)``,
``torch.optim.SGD``, the forward pass formula by formula (:func:`tauopt.models.reference_forward`)
with autograd, the same epochs and training images, and the papers' layer pruning after every
epoch (``TauResNet.prune`` with the trial's threshold and rule; a new optimiser over what is
left); it returns validation accuracy and the parameters left. It has no heartbeats and no
stored models. (Figures measured before 2026-12-04 used a baseline without layer pruning,
which reports the whole network's parameters: see docs/benchmarks.md.)

With ``--same-trials`` every variant runs one list of parameter sets, drawn once by Optuna's
RandomSampler over the same search space and enqueued before the run (the baseline takes the
first of them): the ratios then measure what batching buys for the same work, free of what
each K's sampler happened to propose (a batch of 16 proposes its last trials before any has
finished; a sequential run's later trials are informed, and the default study's Pareto
objective steers them towards heavily pruned, cheap ResNets).

The variants run one after another in each repeat (the order rotates between repeats), so a
drifting machine speed hits each alike; each one's trials per hour is its trials divided by its
wall time, process start and data loading included. Usage::

    python benchmarks/trials_per_hour.py --data-dir ../shared/data [--k 1 4 16] [--trials 16]
        [--baseline-trials 2] [--repeats 2] [--same-trials] [--device cuda] [--json out.json]

On a machine with one GPU, ``benchmarks/gpu.sh`` runs it over K = 1..512 in under ten minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from _machine import JSON_HELP, result_path
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from tauopt.engine import build_model, default_val_size
from tauopt.engine._data import SPLIT_SEED
from tauopt.models import TauResNet, reference_forward
from tauopt.study import load_config
from tauopt.study._objective import DIRECTIONS, suggest_config

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from epoch_speed import torchvision_root  # noqa: E402


def fixed_trials(count: int, seed: int = 1) -> list[dict[str, Any]]:
    """``count`` parameter sets of the default study's search space, drawn at random."""
    config = load_config(REPO / "configs" / "study.toml")
    draw = optuna.create_study(
        directions=DIRECTIONS[config.objective], sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    sets = []
    for number in range(count):
        trial = draw.ask()
        suggest_config(trial, config, seed=number)
        sets.append(dict(trial.params))
    return sets


def service(
    k: int,
    trials: int,
    data_dir: Path,
    threads: int,
    fixed: list[dict[str, Any]] | None = None,
    device: str = "cpu",
    precision: str = "float32",
) -> dict[str, Any]:
    """``tauopt run`` of ``trials`` default-study trials with ``--batch-trials k`` (of the
    parameter sets ``fixed``, enqueued, if given) and ``--precision``."""
    with tempfile.TemporaryDirectory() as tmp:
        if fixed:
            url = f"sqlite:///{tmp}/study.db"
            subprocess.run(
                [sys.executable, "-m", "tauopt", "create", "--storage", url, "--config",
                 str(REPO / "configs" / "study.toml"), "--n-trials", str(trials)],
                check=True, capture_output=True,
            )  # fmt: skip
            study = optuna.load_study(study_name="tauopt", storage=url)
            for params in fixed[:trials]:
                study.enqueue_trial(params)
        cmd = [
            sys.executable, "-m", "tauopt", "run",
            "--config", str(REPO / "configs" / "study.toml"), "--n-trials", str(trials),
            "--storage", f"sqlite:///{tmp}/study.db", "--artifact-dir", f"{tmp}/artifacts",
            "--data-dir", str(data_dir), "--device", device, "--quiet",
            "--threads", str(threads), "--batch-trials", str(k), "--sampler-seed", "1",
            "--precision", precision,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        study = optuna.load_study(study_name="tauopt", storage=f"sqlite:///{tmp}/study.db")
        # Every trial run counts, as in the baseline: a diverged one (the default search's
        # largest lr and T diverge now and then) cost its time too.
        done = [t for t in study.trials if t.state.is_finished()]
        complete = [t for t in done if t.state == optuna.trial.TrialState.COMPLETE]
        inside = sum(sum(t.user_attrs["epoch_seconds"]) for t in complete)
    return {
        "variant": f"service K={k}" + ("" if precision == "float32" else f" {precision}"),
        "trials": len(done),
        "complete": len(complete),
        "seconds": seconds,
        "trials_per_hour": len(done) / seconds * 3600,
        # what the complete trials' own epochs took (a group's epoch time is shared among its
        # members)
        "training_seconds": inside,
    }


def baseline(
    trials: int,
    data_dir: Path,
    threads: int,
    fixed: list[dict[str, Any]] | None = None,
    device: str = "cpu",
    *,
    timeout: float | None = None,
    seed: int = 1,
    keep_study: bool = False,
) -> dict[str, Any]:
    """What a user would write: optimize() over the same space, the papers' training loop
    (``trials`` of them, or as many as ``timeout`` seconds allow)."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    config = load_config(REPO / "configs" / "study.toml")
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(data_dir, Path(tmp))
        full = datasets.MNIST(
            str(root), train=True, download=False, transform=transforms.ToTensor()
        )
        order = torch.randperm(len(full), generator=torch.Generator().manual_seed(SPLIT_SEED))
        held_out = config.trial.val_size or default_val_size(len(full))  # as create settles it
        val_idx, train_idx = order[:held_out], order[held_out:]
        train_set = Subset(full, train_idx[: config.trial.train_images].tolist())
        val_set = Subset(full, val_idx.tolist())

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            cfg = suggest_config(trial, config, seed=trial.number)
            model = build_model(cfg, 784, 10).to(device)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.SGD(params, lr=cfg.lr)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True)
            for _ in range(cfg.epochs):
                for images, labels in loader:
                    images, labels = images.to(device), labels.to(device)
                    optimizer.zero_grad()
                    logits = reference_forward(model, images.view(images.shape[0], -1))
                    loss = F.cross_entropy(logits, labels)
                    taus = model.taus
                    loss = loss + cfg.l1 * taus.abs().sum()
                    loss = loss + cfg.horizon_weight * (taus.sum() - cfg.T) ** 2
                    loss.backward()
                    optimizer.step()
                    model.project_taus_()
                prunes = isinstance(model, TauResNet) and cfg.prune_eps is not None
                if prunes and model.prune(cfg.prune_eps, cfg.prune_rule):  # the papers' per epoch
                    params = [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.SGD(params, lr=cfg.lr)
            correct = 0
            with torch.no_grad():
                for images, labels in DataLoader(val_set, batch_size=1000):
                    images, labels = images.to(device), labels.to(device)
                    logits = reference_forward(model, images.view(images.shape[0], -1))
                    correct += int((logits.argmax(1) == labels).sum())
            return correct / len(val_set), float(model.num_active_params())

        study = optuna.create_study(
            directions=DIRECTIONS[config.objective],
            sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        )
        for params in (fixed or [])[:trials]:
            study.enqueue_trial(params)
        study.optimize(objective, n_trials=trials, timeout=timeout)
    seconds = time.perf_counter() - start
    ran = len(study.trials)
    out: dict[str, Any] = {
        "variant": "baseline optimize()",
        "trials": ran,
        "seconds": seconds,
        "trials_per_hour": ran / seconds * 3600,
    }
    if keep_study:
        out["study"] = study
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--trials", type=int, default=16, help="trials per service run")
    parser.add_argument("--baseline-trials", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--same-trials", action="store_true", help="see the module's docstring")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    parser.add_argument(
        "--precision", default="float32", help="the service's --precision (float32, bfloat16)"
    )
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(
        __file__, args.device, "same_trials" if args.same_trials else ""
    )
    fixed = fixed_trials(max(args.trials, args.baseline_trials)) if args.same_trials else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    variants: list[Any] = [("baseline", 0)] if args.baseline_trials else []
    variants += [("service", k) for k in args.k]
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        shift = repeat % len(variants)
        for kind, k in variants[shift:] + variants[:shift]:
            if kind == "service":
                run = service(
                    k, args.trials, args.data_dir, args.threads, fixed, args.device, args.precision
                )
            else:
                run = baseline(
                    args.baseline_trials, args.data_dir, args.threads, fixed, args.device
                )
            run["repeat"] = repeat
            runs.append(run)
            print(json.dumps(run), flush=True)
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rates = [r["trials_per_hour"] for r in runs if r["variant"] == name]
        summary[name] = {"median_trials_per_hour": statistics.median(rates), "runs": rates}
    print(json.dumps(summary, indent=2))
    args.json.write_text(
        json.dumps(
            {
                "threads": args.threads,
                "device": args.device,
                "same_trials": fixed,
                "runs": runs,
                "summary": summary,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
