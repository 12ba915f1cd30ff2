"""Run one benchmark script from two checkouts of tauopt, alternately, in one run.

Each checkout gets a tree of links laid out as the wheel installs it (``tauopt/``,
``tauopt/models``, ...), so its own code is imported; its copy of the benchmark script runs in
a fresh process with that tree first on ``sys.path``. Rounds alternate old, new, new, old, ...
so that a drifting machine hits both alike; each run writes JSON, and the results go to one
file with the checkouts' commits (by default
``benchmarks/results/checkout_ab_<device>_<date>_<script>.json``).

    python benchmarks/ab/checkout_ab.py --old ../base --new . --rounds 3 \\
        -- benchmarks/epoch_speed.py --data-dir ../shared/data --repeats 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/: _machine
from _machine import commit, result_path

_SUBPACKAGES = ("models", "engine", "storage", "study")


def link_tree(checkout: Path, into: Path) -> Path:
    """``into/tauopt`` laid out as installed, linking to ``checkout``'s files."""
    package = into / "tauopt"
    package.mkdir(parents=True)
    for file in (checkout / "tauopt").glob("*.py"):
        (package / file.name).symlink_to(file.resolve())
    for name in _SUBPACKAGES:
        (package / name).symlink_to((checkout / name).resolve())
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/checkout_ab_...")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- SCRIPT [ARGS...]")
    args = parser.parse_args()
    script = [a for a in args.script if a != "--"]
    if not script:
        parser.error("name the benchmark script to run after --")
    out_path = args.out or result_path(__file__, _device(script), Path(script[0]).stem)
    runs: dict[str, list[object]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="tauopt-ab-") as tmp:
        trees = {side: link_tree(getattr(args, side), Path(tmp) / side) for side in ("old", "new")}
        order = [("old", "new"), ("new", "old")]
        for round_ in range(args.rounds):
            for side in order[round_ % 2]:
                out = Path(tmp) / f"{side}-{round_}.json"
                checkout = getattr(args, side)
                env = {**os.environ, "PYTHONPATH": str(trees[side])}
                command = [
                    sys.executable,
                    str(checkout / script[0]),
                    *script[1:],
                    "--json",
                    str(out),
                ]
                print(f"round {round_ + 1}, {side}: {' '.join(command)}", file=sys.stderr)
                subprocess.run(command, env=env, check=True)
                runs[side].append(json.loads(out.read_text()))
    out_path.write_text(
        json.dumps(
            {
                "script": script,
                "old": {"checkout": str(args.old), "commit": commit(args.old)},
                "new": {"checkout": str(args.new), "commit": commit(args.new)},
                "runs": runs,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out_path}", file=sys.stderr)


def _device(script: list[str]) -> str:
    """The ``--device`` the script is given, else ``cpu``."""
    for flag, value in itertools.pairwise(script):
        if flag == "--device":
            return value
    return "cpu"


if __name__ == "__main__":
    main()
