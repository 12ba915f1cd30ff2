"""The report's figures as PNG files (matplotlib): a grid's panels per network and dataset, a
search's front and importances. Pure functions of the trial views."""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import optuna
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from tauopt.study._config import DEFAULT_MIN_VAL_ACCURACY
from tauopt.study._record import CONFIG_ATTR
from tauopt.study._views import TrialView

#: Every PNG is this size: 1000 x 700 pixels.
FIGSIZE, DPI = (10.0, 7.0), 100
#: The regularisers of the trainable runs, as the report names them: (l1 on, penalty on,
#: last tau) -> name.
REGULARISERS = {
    (False, False, "free"): "none",
    (True, False, "free"): "l1",
    (False, True, "free"): "horizon penalty",
    (True, True, "free"): "l1 + penalty",
    (False, False, "projected"): "exact horizon (projected last tau)",
    (False, False, "dependent"): "exact horizon (dependent last tau)",
}


def regulariser(view: TrialView) -> str | None:
    p = view.record.point
    key = (bool(p.l1), bool(p.horizon_weight), p.last_tau)
    return REGULARISERS.get(key)


def panels(views: Sequence[TrialView]) -> list[tuple[str, str]]:
    """(network, dataset) of the grid, in a fixed order."""
    found = {(v.record.point.arch, v.record.point.dataset) for v in views if v.record.point}
    return sorted(found, key=lambda p: (p[0] != "resnet", p[1]))


def datasets_named(views: Sequence[TrialView]) -> str:
    """The datasets the runs trained on, for a sentence: "both datasets", "all 3 datasets",
    or the one dataset's name (a grid run on one of them is not pooled over two)."""
    found = sorted({v.record.point.dataset for v in views if v.record.point})
    if len(found) == 1:
        return found[0]
    return "both datasets" if len(found) == 2 else f"all {len(found)} datasets"


def pick(views: Sequence[TrialView], **coords: object) -> list[TrialView]:
    return [
        v
        for v in views
        if v.record.point and all(v.record.point.get(k) == c for k, c in coords.items())
    ]


def _legend(ax: Axes) -> None:
    """A legend where something was drawn; an empty panel says so instead."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs of this kind in the study", ha="center", transform=ax.transAxes)


def _marker(points: int) -> str | None:
    """A line of one point draws nothing: a marker shows it (a run of one epoch)."""
    return "o" if points == 1 else None


def _epoch_axis(ax: Axes) -> None:
    """Epochs are whole numbers: no tick at 0.98 (a one-epoch run showed five)."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")


def _log_axis(ax: Axes) -> None:
    """A log scale labelled in plain numbers: within a decade matplotlib labels its minor
    ticks "2.3x10^0", which reads badly and, several to an axis, crowds the labels."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _: _minor_label(ax, value)))


def _minor_label(ax: Axes, value: float) -> str:
    """A minor tick's label where it cannot crowd its neighbours: every one on an axis that
    spans less than a factor 3, else only 1, 2, 3 and 5 times a power of ten (0.9 beside 1
    would overprint it)."""
    low, high = ax.get_ylim()
    if value <= 0 or low <= 0:
        return ""
    leading = value / 10 ** math.floor(math.log10(value))
    if high / low < 3 or round(leading, 6) in (1.0, 2.0, 3.0, 5.0):
        return f"{value:.3g}"
    return ""


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _grid_axes(items: Sequence[object]) -> tuple[Figure, list[Axes]]:
    cols = 2 if len(items) > 1 else 1
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=FIGSIZE, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[len(items) :]:
        ax.set_visible(False)
    return fig, flat


def _curve(
    ax: Axes,
    views: Sequence[TrialView],
    series: Callable[[TrialView], list[float]],
    label: str,
    style: str = "-",
) -> None:
    """Mean over the runs (seeds) epoch by epoch, with a band from min to max."""
    rows = [series(v) for v in views if series(v)]
    if not rows:
        return
    n = min(len(r) for r in rows)
    cols = [[r[i] for r in rows] for i in range(n)]
    epochs = list(range(1, n + 1))
    (line,) = ax.plot(
        epochs,
        [statistics.fmean(c) for c in cols],
        style,
        marker=_marker(n),
        label=f"{label} (n={len(rows)})",
    )
    ax.fill_between(
        epochs, [min(c) for c in cols], [max(c) for c in cols], color=line.get_color(), alpha=0.15
    )


#: The papers' learning rate: a grid that varies the rate draws its curves at this one.
PAPERS_LR = 0.01


def grid_figures(views: Sequence[TrialView], out: Path) -> list[Path]:
    """accuracy.png, taus.png, pruning.png, clean_loss.png and, where the memory varies,
    fracdnn_memory.png; where the learning rate varies, learning_rates.png (the other
    figures then show the runs at the papers' rate)."""
    rates = {v.record.point.lr for v in views if v.record.point.lr is not None}
    extra = []
    if len(rates) > 1:
        extra.append(_rates(views, out))
        views = [v for v in views if v.record.point.lr in (None, PAPERS_LR)]
    files = [_accuracy(views, out), _taus(views, out), _clean_loss(views, out), *extra]
    if any(v.record.point.prunes for v in pick(views, arch="resnet")):
        files.append(_pruning(views, out))
    if len({v.record.point.memory for v in pick(views, arch="fracdnn")}) > 1:
        files.append(_memory(views, out))
    return files


def _accuracy(views: Sequence[TrialView], out: Path) -> Path:
    where = panels(views)
    fig, axes = _grid_axes(where)
    for ax, (arch, dataset) in zip(axes, where, strict=False):
        for T, style in ((1.0, "-"), (6.0, "--")):
            for taus in ("fixed", "input-fixed", "trainable"):
                chosen = pick(
                    views, arch=arch, dataset=dataset, T=T, taus=taus, l1=0.0,
                    horizon_weight=0.0, last_tau="free", pruning="off",
                )  # fmt: skip
                _curve(
                    ax,
                    chosen,
                    lambda v: v.record.history.test_accuracy,
                    f"{taus} taus, T={T:g}",
                    style,
                )
        ax.set_title(f"{arch}, {dataset}")
        _epoch_axis(ax)
        ax.set_ylabel("test accuracy")
        _legend(ax)
    fig.suptitle(
        "Fixed against trainable step sizes, nothing else on (mean over seeds, band: min to max)"
    )
    return _save(fig, out / "accuracy.png")


def _rates(views: Sequence[TrialView], out: Path) -> Path:
    """Final test accuracy against the learning rate, per arm (T = 1, nothing else on)."""
    where = panels(views)
    fig, axes = _grid_axes(where)
    for ax, (arch, dataset) in zip(axes, where, strict=False):
        for taus, marker in (("fixed", "s"), ("input-fixed", "^"), ("trainable", "o")):
            chosen = [v for v in pick(views, arch=arch, dataset=dataset, T=1.0, taus=taus)]
            rates = sorted({float(v.record.point.lr or 0.0) for v in chosen})
            if not rates:
                continue
            cols = [
                [100 * v.record.test_accuracy for v in chosen if v.record.point.lr == lr]
                for lr in rates
            ]
            means = [statistics.fmean(c) for c in cols]
            low = [m - min(c) for m, c in zip(means, cols, strict=True)]
            high = [max(c) - m for m, c in zip(means, cols, strict=True)]
            # Rates may have run with different numbers of seeds (a part of the grid still to
            # run, a run that diverged): the legend gives the range, not one of them.
            few, most = min(len(c) for c in cols), max(len(c) for c in cols)
            n = f"{few}" if few == most else f"{few} to {most} per rate"
            ax.errorbar(rates, means, yerr=[low, high], marker=marker, capsize=3,
                        label=f"{taus} taus (n={n})")  # fmt: skip
        ax.set_xscale("log")
        shown = sorted({float(v.record.point.lr or 0.0) for v in pick(views, arch=arch)})
        ax.set_xticks(shown, [f"{r:g}" for r in shown])
        ax.minorticks_off()
        ax.set_title(f"{arch}, {dataset}, T=1")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy (%)")
        _legend(ax)
    fig.suptitle("Each arm at every learning rate (mean over seeds, bars: min to max)")
    return _save(fig, out / "learning_rates.png")


def _taus(views: Sequence[TrialView], out: Path) -> Path:
    where = panels(views)
    fig, axes = _grid_axes(where)
    for ax, (arch, dataset) in zip(axes, where, strict=False):
        chosen = pick(
            views, arch=arch, dataset=dataset, T=1.0, taus="trainable", l1=0.0,
            horizon_weight=0.0, last_tau="free", pruning="off",
        )  # fmt: skip
        for v in sorted(chosen, key=lambda v: v.record.point.seed)[:1]:
            for block in range(v.record.config.depth):
                ax.plot(
                    range(1, len(v.record.history.taus) + 1),
                    [row[block] for row in v.record.history.taus],
                    marker=_marker(len(v.record.history.taus)),
                    label=f"tau_{block}",
                )
            ax.set_title(f"{arch}, {dataset}, T=1, seed {v.record.point.seed}")
        ax.axhline(0.0, color="grey", linewidth=0.5)
        _epoch_axis(ax)
        ax.set_ylabel("step size tau_l")
        _legend(ax)
    fig.suptitle("The step sizes over training (trainable taus, nothing else on)")
    return _save(fig, out / "taus.png")


def _clean_loss(views: Sequence[TrialView], out: Path) -> Path:
    """One panel per network and T: the horizons' losses differ by far more than the
    regularisers' (a pooled band would hide them)."""
    archs = sorted({a for a, _ in panels(views)}, key=lambda a: a != "resnet")
    horizons = sorted({v.record.point.T for v in views})
    where = [(arch, T) for arch in archs for T in horizons]
    fig, axes = _grid_axes(where)
    for ax, (arch, T) in zip(axes, where, strict=False):
        trainable = [v for v in pick(views, arch=arch, T=T, taus="trainable", pruning="off")]
        for name in dict.fromkeys(REGULARISERS.values()):
            chosen = [v for v in trainable if regulariser(v) == name]
            _curve(ax, chosen, lambda v: v.record.history.clean_loss, name)
        _log_axis(ax)
        ax.set_title(f"{arch}, T={T:g}")
        _epoch_axis(ax)
        ax.set_ylabel("training cross-entropy (epoch mean)")
        _legend(ax)
    fig.suptitle(
        "How the clean loss (cross-entropy, no penalties) decays under each regulariser\n"
        f"trainable taus, no pruning, {datasets_named(views)}"
    )
    return _save(fig, out / "clean_loss.png")


def _pruning(views: Sequence[TrialView], out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    for dataset in sorted({d for a, d in panels(views) if a == "resnet"}):
        coords = {
            "dataset": dataset,
            "arch": "resnet",
            "taus": "trainable",
            "horizon_weight": 0.0,
            "last_tau": "free",
        }
        pruned = [v for v in pick(views, **coords) if v.record.point.prunes and v.record.point.l1]
        kept = [v for v in pick(views, pruning="off", **coords) if v.record.point.l1]
        _curve(
            left,
            pruned,
            lambda v: [float(b) for b in v.record.history.blocks_before_pruning()],
            f"{dataset}, pruning",
        )
        _curve(right, pruned, lambda v: v.record.history.epoch_seconds, f"{dataset}, pruning")
        _curve(
            right, kept, lambda v: v.record.history.epoch_seconds, f"{dataset}, no pruning", "--"
        )
    left.set_title("Blocks trained per epoch")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("blocks trained in the epoch (pruning follows it)")
    right.set_title("Seconds per epoch")
    right.set_ylabel("seconds (a population's time shared out)")
    fig.suptitle("Pruning: the ResNet with l1 on, every T (mean over runs, band: min to max)")
    for ax in (left, right):
        _epoch_axis(ax)
    for ax in (left, right):
        _legend(ax)
    return _save(fig, out / "pruning.png")


def _memory(views: Sequence[TrialView], out: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    base = {
        "arch": "fracdnn",
        "T": 1.0,
        "taus": "trainable",
        "l1": 0.0,
        "horizon_weight": 0.0,
        "last_tau": "free",
    }
    datasets = sorted({d for a, d in panels(views) if a == "fracdnn"})
    for dataset in datasets:
        for memory, style in (("full", "-"), ("detached", "--")):
            chosen = pick(views, dataset=dataset, memory=memory, **base)
            _curve(
                left,
                chosen,
                lambda v: v.record.history.test_accuracy,
                f"{dataset}, {memory} memory gradient",
                style,
            )
    for offset, memory in ((-0.2, "full"), (0.2, "detached")):
        chosen = pick(views, dataset=datasets[0], memory=memory, **base) if datasets else []
        if chosen:
            depth = chosen[0].record.config.depth
            means = [
                statistics.fmean(
                    v.record.history.taus[-1][b] for v in chosen if v.record.history.taus
                )
                for b in range(depth)
            ]
            right.bar([b + offset for b in range(depth)], means, width=0.4, label=memory)
    left.set_title("Fractional DNN: test accuracy")
    _epoch_axis(left)
    left.set_ylabel("test accuracy")
    right.set_title(f"Final step sizes ({datasets[0] if datasets else '-'}, mean over seeds)")
    right.set_xlabel("block l")
    right.set_ylabel("tau_l after the last epoch")
    _log_axis(right)
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (left, right):
        _legend(ax)
    return _save(fig, out / "fracdnn_memory.png")


def _objective(study: optuna.Study, index: int) -> Callable[[optuna.trial.FrozenTrial], float]:
    # The evaluator ranks parameters by how they lower the target: negate what is maximised.
    sign = -1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def value(trial: optuna.trial.FrozenTrial) -> float:
        return sign * float(trial.values[index])

    return value


def min_val_accuracy(study: optuna.Study) -> float:
    """The study's feasibility floor, as stored with its config."""
    stored = study.user_attrs.get(CONFIG_ATTR, {}).get("study", {})
    return float(stored.get("min_val_accuracy", DEFAULT_MIN_VAL_ACCURACY))


def _trials(
    ax: Axes, views: Sequence[TrialView], marker: str, colour: str, label: str, alpha: float = 0.6
) -> None:
    """The trials as points; none drawn (and no legend entry) for a kind that is not there."""
    if views:
        ax.scatter(
            [v.record.active_params for v in views],
            [v.record.final_val_accuracy for v in views],
            marker=marker,
            color=colour,
            alpha=alpha,
            label=label,
        )


def _pareto(study: optuna.Study, views: Sequence[TrialView], out: Path) -> Path:
    """The feasible trials and their front; the infeasible ones greyed beneath them."""
    fig, ax = plt.subplots(figsize=FIGSIZE)
    floor = min_val_accuracy(study)
    feasible = [v for v in views if v.feasible]
    infeasible = [v for v in views if not v.feasible]
    # grey, as the dashboard greys them, but opaque: a pale cross at 0.6 alpha was barely seen
    label = f"infeasible: below min_val_accuracy = {floor:g}"
    _trials(ax, infeasible, "x", "0.55", label, alpha=1.0)
    for pruned, marker, colour, label in (
        (False, "o", "C0", "no block removed"),
        (True, "^", "C1", "blocks removed by pruning"),
    ):
        chosen = [v for v in feasible if bool(v.record.history.pruned) == pruned]
        _trials(ax, chosen, marker, colour, label)
    front = sorted((v for v in feasible if v.pareto), key=lambda v: v.record.active_params)
    if front:
        ax.plot(
            [v.record.active_params for v in front],
            [v.record.final_val_accuracy for v in front],
            "k-",
            marker="s",
            mfc="none",
            label="Pareto front",
        )
    if not feasible:  # blank axes would read as a broken figure
        best = max((v.record.final_val_accuracy for v in views), default=math.nan)
        ax.text(
            0.5,
            0.5,
            f"no feasible trial yet: every trial is below min_val_accuracy = {floor:g}\n"
            f"(the best reached {best:.4f}): train longer, or lower min_val_accuracy in a new "
            "study",
            ha="center",
            va="center",
            transform=ax.transAxes,
            bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
        )
    ax.set_xlabel("active parameters after pruning")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Pareto front of the feasible trials")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, out / "pareto.png")


def search_figures(study: optuna.Study, views: Sequence[TrialView], out: Path) -> list[Path]:
    """pareto.png (the feasible trials and their front) and importance.png."""
    return [_pareto(study, views, out), _importance(study, out)]


def _importance(study: optuna.Study, out: Path) -> Path:
    """Optuna's parameter importances, one panel per objective."""
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    fig, axes = plt.subplots(1, len(names), figsize=FIGSIZE, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0][i]
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                importances = optuna.importance.get_param_importances(
                    study, target=_objective(study, i)
                )
        except (ValueError, RuntimeError) as e:  # too few trials or one parameter
            ax.text(0.5, 0.5, f"no importances: {e}", ha="center", wrap=True)
            importances = {}
        ax.barh(list(importances), list(importances.values()))
        # Optuna's evaluator warns on any target (_objective set the sign) and where it
        # cannot rank: then the bars are equal by construction, which the reader is told.
        if any("importances will be equal" in str(w.message) for w in caught):
            ax.text(
                0.5,
                1.0,
                f"equal by default: the trials do not yet\ndiffer enough in {name} to rank",
                transform=ax.transAxes,
                ha="center",
                va="bottom",
                fontsize=8,
                color="dimgrey",
            )
        ax.set_title(f"Parameter importance for {name}", pad=24)
        ax.set_xlabel("importance (Optuna's default evaluator)")
        ax.set_ylabel("parameter")
    return _save(fig, out / "importance.png")
