"""A claimed batch of default-study trials, trained the way the worker groups it, against one
population of all of them.

``tauopt.engine.train_population`` trains ResNets that may prune apart from fractional
networks when each side fills a population of its own (so that the ResNets' stack can shrink
as they prune; a fractional block is never pruned). This times that against one mixed
population of the same trials: 16 parameter sets of the default study (``configs/study.toml``,
its trial size: 10 epochs on 50,000 images), drawn at random as ``trials_per_hour.py
--same-trials`` draws them, trained in-process, the two ways alternating in rotated order.
Both ways give the same results (the script checks the kept blocks); the times differ.

    python benchmarks/population_groups.py --data-dir ../shared/data [--seeds 1 2]
        [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from _machine import JSON_HELP, result_path

import tauopt.engine._population as population
from tauopt.engine import TrainConfig, load_dataset, train_population
from tauopt.study import load_config
from tauopt.study._objective import suggest_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trials_per_hour import REPO, fixed_trials


def _configs(seed: int, count: int) -> list[TrainConfig]:
    config = load_config(REPO / "configs" / "study.toml")
    sets = fixed_trials(count, seed=seed)
    return [
        suggest_config(optuna.trial.FixedTrial(params), config, seed=number)
        for number, params in enumerate(sets)
    ]


def _all_together(configs: Any) -> list[list[int]]:
    return [list(range(len(configs)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help=JSON_HELP)
    args = parser.parse_args()
    args.json = args.json or result_path(__file__)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dataset = load_dataset("mnist", args.data_dir)
    ways = {"as the worker groups them": population._parts, "one population": _all_together}
    runs = []
    for seed in args.seeds:
        configs = _configs(seed, args.trials)
        archs = "".join(c.arch[0] for c in configs)
        kept: dict[str, list[int]] = {}
        for repeat in range(args.repeats):
            order = list(ways) if repeat % 2 == 0 else list(ways)[::-1]
            for name in order:
                population._parts = ways[name]
                start = time.perf_counter()
                results = train_population(configs, dataset, device="cpu")
                seconds = time.perf_counter() - start
                blocks = [
                    -1 if isinstance(r, Exception) else len(r.active_block_ids) for r in results
                ]
                kept.setdefault(name, blocks)
                if blocks != kept[name]:
                    raise SystemExit(f"{name}: kept blocks {blocks} differ from {kept[name]}")
                run = {"seed": seed, "archs": archs, "way": name, "repeat": repeat,
                       "seconds": seconds, "blocks": blocks}  # fmt: skip
                runs.append(run)
                print(json.dumps(run), flush=True)
        population._parts = ways["as the worker groups them"]
        if kept["one population"] != kept["as the worker groups them"]:
            raise SystemExit("the two ways kept different blocks")
    args.json.write_text(json.dumps(runs, indent=2) + "\n")


if __name__ == "__main__":
    main()
