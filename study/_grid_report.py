"""The report of a ``tauopt reproduce`` grid as markdown: what ran, what a seed varies, the
paired comparisons with their corrected verdicts, each arm at its best learning rate, and
descriptions of the taus and the loss. Pure functions of the runs (see :class:`GridRuns`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tauopt.engine import TrainConfig
from tauopt.study._comparisons import (
    BEST_TABLE,
    MEASURES,
    Comparison,
    adjust,
    best_rate_comparisons,
    best_rates,
    mean_and_interval,
    paired,
)
from tauopt.study._evidence import ALPHA
from tauopt.study._plots import REGULARISERS, datasets_named, panels, pick, regulariser
from tauopt.study._views import TrialView

#: The papers' budget: 200 epochs on every training image.
PAPERS_EPOCHS = 200


@dataclass(frozen=True)
class GridRuns:
    """The finished runs of one grid, from one or more studies or exports: their views, when
    each ran, how many runs the sources held in all, and where they came from."""

    sources: tuple[str, ...]
    views: tuple[TrialView, ...]
    spans: tuple[tuple[datetime, datetime], ...]
    planned: int
    #: Runs that failed through their own fault (diverged, say): coordinates and reason.
    failed: tuple[tuple[dict[str, Any], str], ...] = ()


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Iterable[str]) -> list[str]:
    return [_row(*header), "|---" * len(header) + "|", *rows]


def _p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _mean(values: Iterable[float], fmt: str = ".4f") -> str:
    data = [v for v in values if not math.isnan(v)]
    return format(statistics.fmean(data), fmt) if data else "-"


def _config_values(runs: GridRuns, value: Callable[[TrainConfig], Any]) -> list[Any]:
    return sorted({value(v.record.config) for v in runs.views}, key=lambda x: (x is None, str(x)))


def seeding(views: Sequence[TrialView]) -> str:
    """What a seed varied in these runs, in one paragraph."""
    draws: dict[Any, set[tuple[Any, Any]]] = {}
    for v in views:
        c = v.record.config
        draws.setdefault(c.seed, set()).add((c.data_seed, c.split_seed))
    own = [next(iter(d)) for d in draws.values() if len(d) == 1]
    independent = (
        len(draws) > 1
        and len(own) == len(draws)
        and len(set(own)) == len(own)
        and all(split is not None for _, split in own)
    )
    if independent:
        return (
            "**What a seed varies:** a seed draws a run's initial weights, the order of its "
            "batches and its validation split (and the subset a smaller training size takes). "
            "The runs of one seed share all three, so that the two runs of a pair differ in "
            "their factor only; the seeds are independent replicates."
        )
    return (
        "**What a seed varies:** the initial weights only. Every run of these studies saw one "
        "batch order and one validation split, so the intervals show how the results scatter "
        "over initial weights alone: they leave out what the batch order and the split would "
        "add, and may be narrower than intervals over independent replicates."
    )


def budget(runs: GridRuns) -> list[str]:
    views = runs.views
    protocols = sorted({v.record.point.protocol for v in views})
    epochs = _config_values(runs, lambda c: c.epochs)
    sizes = ["all" if s is None else f"{s:,}" for s in _config_values(runs, lambda c: c.train_size)]
    held = [s for s in _config_values(runs, lambda c: c.val_size) if s]
    seeds = sorted({v.record.point.seed for v in views})
    lines = [
        f"Protocol {', '.join(f'`{p}`' for p in protocols)}: {len(views)} finished runs of "
        f"{runs.planned}, {'/'.join(map(str, epochs))} epochs on {'/'.join(sizes)} training "
        f"images each{_held(held)}, seeds {seeds}; from {', '.join(runs.sources)}.",
        "",
        seeding(views),
        "",
        *_compute(runs),
    ]
    short = [e for e in epochs if e < PAPERS_EPOCHS] or [s for s in sizes if s != "all"]
    if short:
        lines += [
            f"**Scaled down:** the papers train {PAPERS_EPOCHS} epochs on all 60,000 images; "
            f"these runs trained {'/'.join(map(str, epochs))} epochs on {'/'.join(sizes)} "
            "images. What holds here may not hold at convergence, and the verdicts are about "
            "this budget only.",
            "",
        ]
    if len(seeds) < 2:
        lines += [
            "**One seed:** there are mean differences but no intervals and no verdicts: "
            "the runs of one seed cannot tell a factor's effect from the seed's. Run "
            "`tauopt reproduce --seeds 3` (or more) for evidence.",
            "",
        ]
    return lines


def _held(held: list[Any]) -> str:
    if not held:
        return " (no validation images held out)"
    return f" (but the {'/'.join(f'{h:,}' for h in held)} held out for validation)"


def failed_section(runs: GridRuns) -> list[str]:
    """The runs that failed through their own fault, counted by setting: a diverged run is
    no candidate for its arm's best learning rate, and a reader should know which failed."""
    if not runs.failed:
        return []
    groups: dict[tuple[str, str], list[str]] = {}
    for coords, reason in runs.failed:
        shown = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in coords.items()
            if k not in ("protocol", "seed") and v is not None
        )
        text = " ".join(reason.split())
        epoch = re.search(r"in epoch (\d+)", text)
        why = re.sub(r"in epoch \d+", "in epoch", text)[:160]
        groups.setdefault((shown, why), []).append(epoch.group(1) if epoch else "-")
    rows = [
        _row(where, len(epochs), why, ", ".join(sorted(epochs, key=lambda e: (len(e), e))))
        for (where, why), epochs in sorted(groups.items())
    ]
    return [
        "## Runs that failed",
        "",
        f"{len(runs.failed)} {'run' if len(runs.failed) == 1 else 'runs'} failed through their "
        "own fault and are left out of every table (they used their budget; a run stopped "
        "by its worker is retried instead).",
        "",
        *_table(("run", "seeds", "why", "epochs"), rows),
        "",
    ]


def _compute(runs: GridRuns) -> list[str]:
    """Compute per run (its epochs' seconds: a population's shared out) and the wall time
    from the first run's start to the last run's end."""
    per_run = sorted(sum(v.record.history.epoch_seconds) for v in runs.views)
    if not per_run or not runs.spans:
        return []
    start = min(s for s, _ in runs.spans)
    wall = (max(e for _, e in runs.spans) - start).total_seconds()
    machines = sorted({v.record.machine or v.record.device for v in runs.views})
    return [
        f"Compute per run (the seconds of its epochs; runs trained together as a population "
        f"share an epoch's time): median {statistics.median(per_run):.1f} s, range "
        f"{per_run[0]:.1f}-{per_run[-1]:.1f} s, {sum(per_run) / 3600:.2f} h in all, on "
        f"{'; '.join(machines)}; wall time from the first start to the last end "
        f"{wall / 3600:.2f} h ({start:%Y-%m-%d}).",
        "",
    ]


def comparisons(views: Sequence[TrialView]) -> list[Comparison]:
    """Every comparison of the report, with the family's adjustments."""
    rows = [row for measure in MEASURES for row in paired(views, measure)]
    return adjust(rows + best_rate_comparisons(views))


def reading(rows: Sequence[Comparison]) -> list[str]:
    """How to read the verdicts, with the family's counts."""
    tested = [r for r in rows if r.diff.p_value is not None]
    equal = sum(r.diff.all_equal for r in rows)
    raw = sum(r.diff.verdict in ("higher", "lower") for r in tested)
    kept = sum(r.verdict.endswith("(Holm)") for r in tested)
    fdr = sum(
        r.bh_q is not None and r.bh_q < ALPHA and r.diff.verdict != "no difference detected"
        for r in tested
    )
    small = sorted({r.diff.n for r in tested if r.diff.n <= 5})
    lines = [
        "## How to read the verdicts",
        "",
        f"This report makes **{len(tested)} comparisons** with a test (the rows of every table "
        f"below with two or more seeds that do not all agree); {raw} of them have a 95 % "
        f"interval that excludes 0, **{kept} {'survives' if kept == 1 else 'survive'} Holm's "
        "correction** over all "
        f"{len(tested)}, and {fdr} have a Benjamini-Hochberg q below {ALPHA:g}. "
        f"{equal} more rows have every seed equal: their interval has zero width and they "
        'get no verdict ("all seeds equal").',
        "",
        '- **Cite a single comparison by its Holm verdict.** "higher (Holm)" or "lower '
        '(Holm)" holds with the chance that *any* verdict of this report is wrong kept under '
        '5 %; "higher (unadjusted only)" means the interval alone excludes 0, which among '
        f"{len(tested)} comparisons happens by chance alone about {0.05 * len(tested):.1f} "
        "times.",
        "- **Use the q values (Benjamini-Hochberg) to read the tables as a whole:** taking every "
        f"row with q < {ALPHA:g} as a detection, about 5 % of those detections are expected "
        "to be false.",
        '- "no difference detected" is not evidence of no effect where the interval is wide.',
    ]
    if small:
        lines.append(
            f"- With n = {', '.join(map(str, small))} seeds the t interval rests on the "
            "per-seed differences being normally distributed, which so few values cannot check."
        )
    return [*lines, ""]


_HEADER = (
    "factor",
    "difference",
    "network",
    "dataset",
    "stratum",
    "pairs (seeds)",
    "mean",
    "95 % interval (t)",
    "p",
    "Holm p",
    "BH q",
    "verdict",
)
#: Why a measure's table has no row.
_EMPTY = {
    "": "No pair of runs here differs in one factor only: the study has none of the grid's "
    "pairs (run `tauopt reproduce` without `--only`).",
    "Blocks removed by pruning": "No row: no pair of runs here has pruning on in either run, "
    "and elsewhere both runs keep every block by construction (the grid's pruning cells "
    "come with `tauopt reproduce` without `--only fixed-vs-trainable`).",
}
#: Why every difference of a measure's table is 0.
_ALL_ZERO = {
    "pts": "Every difference is 0: paired runs ended alike.",
    "epochs": "Every difference is 0: in every pair both runs reached the target in the same "
    "epoch.",
    "blocks": "Every difference is 0: no run removed a different number of blocks than its "
    "pair (no tau fell below its threshold, or both fell alike).",
}


def _all_zero(rows: Sequence[Comparison]) -> bool:
    return all(r.diff.mean == 0 and (r.diff.n == 1 or r.diff.all_equal) for r in rows)


def _one_epoch(views: Sequence[TrialView]) -> str:
    epochs = {v.record.config.epochs for v in views}
    if epochs != {1}:
        return ""
    return (
        " With one epoch a run, the first epoch is the last: train more epochs (`tauopt "
        "reproduce --epochs`) for this measure to say anything."
    )


def paired_section(views: Sequence[TrialView], rows: Sequence[Comparison]) -> list[str]:
    lines = [
        "## Paired differences",
        "",
        "Each row compares runs that differ in one factor only: same network, dataset and seed, "
        'every other setting equal (the "stratum" column names the settings that tell the '
        "rows of one factor apart). The difference is the second run's value minus the "
        'first\'s (the "difference" column says which), accuracies in percentage points '
        "(pts). The interval is the 95 % Student t interval over the seeds; the verdict is "
        "explained above.",
        "",
    ]
    for measure in MEASURES:
        chosen = [r for r in rows if r.table == measure.title]
        lines += [f"### {measure.title}", ""]
        if not chosen:
            lines += [_EMPTY.get(measure.title, _EMPTY[""]), ""]
            continue
        if measure.unit == "epochs":
            lines += [
                "A run that never reaches the target has no epoch and leaves its pair out; "
                '"all seeds equal" at 0.0 means both runs of every pair reached it in the same '
                "epoch.",
                "",
            ]
        lines += [*_table(_HEADER, (_cells(r, measure.unit) for r in chosen)), ""]
        if _all_zero(chosen):
            lines += [_ALL_ZERO[measure.unit] + _one_epoch(views), ""]
    return lines


def _cells(r: Comparison, unit: str) -> str:
    d = r.diff
    mean = "-" if d.n == 0 else f"{d.mean:{r.fmt}}"
    interval = d.interval(r.fmt)
    return _row(
        *r.cells, f"{mean} {unit}", interval, _p(d.p_value), _p(r.holm_p), _p(r.bh_q), r.verdict
    )


def lr_section(views: Sequence[TrialView], rows: Sequence[Comparison]) -> list[str]:
    """Each arm at its best learning rate, and the whole rate x arm table."""
    best = best_rates(views)
    if not best:
        return []
    lines = [
        "## Trainable taus, or a larger step?",
        "",
        "Trainable taus grow far above their initial T / 6, and a block's update scales with "
        'its tau as with the learning rate: at one learning rate, "trainable beats fixed" may '
        'be "a larger step beats a smaller one". So every arm trained at several learning '
        "rates. Per seed, network, dataset and T, each arm takes the rate whose run has the "
        "highest final validation accuracy; the arms are then compared by the final *test* "
        "accuracy of those runs, paired by seed.",
        "",
        f"### {BEST_TABLE}",
        "",
    ]
    header = ("difference", "network", "dataset", "T", "seeds", "mean", "95 % interval (t)")
    chosen = [r for r in rows if r.table == BEST_TABLE]
    tail = ("p", "Holm p", "BH q", "verdict")
    lines += [*_table((*header, *tail), (_cells(r, "pts") for r in chosen)), ""]
    lines += ["### The learning rates chosen", ""]
    rates = ("network", "dataset", "T", "arm", "test accuracy at the chosen rate", "chosen")
    chosen_rows = []
    for key in sorted({(k[0], k[1], k[2], k[4]) for k in best}, key=str):
        runs = [v for k, v in best.items() if (k[0], k[1], k[2], k[4]) == key]
        counts: dict[Any, int] = {}
        for v in runs:
            lr = v.record.point.lr
            counts[lr] = counts.get(lr, 0) + 1
        picked = ", ".join(f"lr {lr:g}: {n}" for lr, n in sorted(counts.items()))
        acc = _mean((100 * v.record.test_accuracy for v in runs), ".2f")
        chosen_rows.append(_row(*key[:2], f"{key[2]:g}", key[3], f"{acc} pts", picked))
    lines += [*_table(rates, chosen_rows), ""]
    return lines + every_rate(views)


def every_rate(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "### Every learning rate",
        "",
        "Final test accuracy per arm and rate, mean over the seeds with its 95 % t interval "
        "(descriptive: the verdicts are in the tables above), and the mean final validation "
        "accuracy the rates were chosen on.",
        "",
    ]
    header = ("network", "dataset", "T", "arm", "lr", "seeds", "test accuracy", "validation")
    keys = {
        (p.arch, p.dataset, p.T, p.taus, p.lr)
        for v in views
        if (p := v.record.point).lr is not None
    }
    rows = []
    for key in sorted(keys, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
        runs = [
            v for v in pick(views, arch=key[0], dataset=key[1], T=key[2], taus=key[3], lr=key[4])
        ]
        d = mean_and_interval([100 * v.record.test_accuracy for v in runs])
        val = _mean((100 * v.record.final_val_accuracy for v in runs), ".2f")
        interval = "" if d.low is None else f" {d.interval('.2f')}"
        test = f"{d.mean:.2f}{interval} pts"
        rows.append(_row(*key[:2], f"{key[2]:g}", key[3], f"{key[4]:g}", d.n, test, f"{val} pts"))
    return [*lines, *_table(header, rows), ""]


def ends_section(views: Sequence[TrialView]) -> list[str]:
    """Where each arm ends (descriptive): final training and test accuracy and the taus of
    the runs with nothing else on, so that a difference above can be read against the level
    it starts from (a gap between an underfitting and a fitting network says little)."""
    lines = [
        "## Where each arm ends",
        "",
        "Runs with nothing else on (no l1, no horizon penalty, a free last tau, no pruning), "
        "means over the seeds; the taus' range over the runs' final step sizes.",
        "",
    ]
    header = (
        "network",
        "dataset",
        "T",
        "taus",
        "lr",
        "runs",
        "training accuracy",
        "test accuracy",
        "final taus (min to max)",
    )
    plain = {"l1": 0.0, "horizon_weight": 0.0, "last_tau": "free"}
    rows = []
    for arch, dataset in panels(views):
        chosen = [
            v for v in pick(views, arch=arch, dataset=dataset, **plain) if not v.record.point.prunes
        ]
        keys = {(v.record.point.T, v.record.point.taus, _rate(v)) for v in chosen}
        for T, taus, lr in sorted(keys, key=str):
            runs = [
                v
                for v in chosen
                if v.record.point.T == T and v.record.point.taus == taus and _rate(v) == lr
            ]
            train = _mean((100 * (v.record.train_accuracy or math.nan) for v in runs), ".2f")
            test = _mean((100 * v.record.test_accuracy for v in runs), ".2f")
            final = [t for v in runs for t in v.record.taus]
            spread = f"{min(final):.3g} to {max(final):.3g}" if final else "-"
            rows.append(
                _row(
                    arch,
                    dataset,
                    f"{T:g}",
                    taus,
                    f"{lr:g}",
                    len(runs),
                    f"{train} pts",
                    f"{test} pts",
                    spread,
                )
            )
    return [*lines, *_table(header, rows), ""]


def _rate(view: TrialView) -> float:
    """The run's learning rate: its coordinate where the grid varies it, else its config's."""
    lr = view.record.point.lr
    return view.record.config.lr if lr is None else lr


def _archs(views: Sequence[TrialView]) -> list[str]:
    return sorted({a for a, _ in panels(views)}, key=lambda a: a != "resnet")


def _Ts(views: Sequence[TrialView]) -> list[float]:
    return sorted({v.record.point.T for v in views})


def _pooled(views: Sequence[TrialView]) -> str:
    """How the table pools the datasets: "both datasets pooled", or "mnist only" where the
    grid ran on one."""
    one = len({v.record.point.dataset for v in views if v.record.point}) == 1
    return f"{datasets_named(views)} {'only' if one else 'pooled'}"


def clean_loss_section(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "## How the loss decays",
        "",
        "Clean loss (training cross-entropy without the penalties, mean over an epoch's batches) "
        "of the trainable runs without pruning, mean over runs of "
        f"{datasets_named(views)}: after the first epoch, at the middle and at the end "
        "([clean_loss.png](clean_loss.png)).",
        "",
    ]
    header = ("network", "T", "regulariser", "runs", "epoch 1", "middle", "last")
    rows = []
    for arch in _archs(views):
        for T in _Ts(views):
            trainable = pick(views, arch=arch, T=T, taus="trainable", pruning="off")
            for name in dict.fromkeys(REGULARISERS.values()):
                runs = [v.record.history.clean_loss for v in trainable if regulariser(v) == name]
                runs = [r for r in runs if r]
                if runs:
                    mid = min(len(r) for r in runs) // 2
                    rows.append(
                        _row(
                            arch,
                            f"{T:g}",
                            name,
                            len(runs),
                            _mean(r[0] for r in runs),
                            _mean(r[mid] for r in runs),
                            _mean(r[-1] for r in runs),
                        )
                    )
    return [*lines, *_table(header, rows), ""]


def regulariser_section(views: Sequence[TrialView]) -> list[str]:
    """The regularisers side by side (descriptive: the paired rows give the evidence)."""
    lines = [
        "## The regularisers side by side",
        "",
        f"Trainable runs per network and T, {_pooled(views)} (descriptive), means over runs: "
        "final test accuracy, how far the taus end from the horizon (`|sum(tau) - T|`), how "
        "much of `sum|tau|` the largest tau holds, and the blocks pruning removed (runs with "
        "pruning on).",
        "",
    ]
    header = (
        "network",
        "T",
        "regulariser",
        "runs",
        "test accuracy",
        "abs(sum(tau) - T)",
        "largest tau's share",
        "blocks removed",
    )
    rows = []
    for arch in _archs(views):
        for T in _Ts(views):
            trainable = pick(views, arch=arch, T=T, taus="trainable")
            for name in dict.fromkeys(REGULARISERS.values()):
                runs = [v for v in trainable if regulariser(v) == name and v.record.taus]
                if not runs:
                    continue
                pruning = [float(v.record.blocks_removed) for v in runs if _prunes(v)]
                rows.append(
                    _row(
                        arch,
                        f"{T:g}",
                        name,
                        len(runs),
                        _mean(v.record.test_accuracy for v in runs),
                        _mean(abs(v.record.tau_sum - T) for v in runs),
                        _mean(
                            max(map(abs, v.record.taus)) / sum(map(abs, v.record.taus))
                            for v in runs
                        ),
                        _mean(pruning, ".2f") if pruning else "-",
                    )
                )
    return [*lines, *_table(header, rows), ""]


def _prunes(view: TrialView) -> bool:
    return view.record.point.prunes


def tau_section(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "## Negative step sizes",
        "",
        "The ResNet's taus are not projected (neither in the papers' code): gradient steps and "
        "the l1 penalty's sign term can carry a tau below 0, where its block subtracts. The "
        "Fractional DNN holds every tau at tau_min or above.",
        "",
    ]
    header = (
        "network",
        "T",
        "runs with trained taus",
        "a tau below 0 at some epoch",
        "below 0 at the end",
        "of those, by regulariser",
        "lowest final tau",
    )
    rows = []
    for arch in _archs(views):
        for T in _Ts(views):
            runs = [v for v in pick(views, arch=arch, T=T) if v.record.point.taus != "fixed"]
            ever = sum(any(t < 0 for row in v.record.history.taus for t in row) for v in runs)
            below = [v for v in runs if any(t < 0 for t in v.record.taus)]
            kinds: dict[str, int] = {}
            for v in below:
                name = regulariser(v) or "other"
                kinds[name] = kinds.get(name, 0) + 1
            which = ", ".join(f"{k}: {n}" for k, n in kinds.items()) or "-"
            lowest = f"{min(min(v.record.taus) for v in below):.3g}" if below else "-"
            rows.append(_row(arch, f"{T:g}", len(runs), ever, len(below), which, lowest))
    return [*lines, *_table(header, rows), ""]
