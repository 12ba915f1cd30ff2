"""``tauopt report``: a study's figures as PNG files and a report.md that answers, from the
study's own trials, the questions the papers leave open."""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import optuna
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tauopt.study._figures import publish
from tauopt.study._reproduce import REPRODUCE_ATTR
from tauopt.study._views import TrialView, trial_views

#: Every PNG is this size: 1000 x 700 pixels.
FIGSIZE, DPI = (10.0, 7.0), 100
DATASETS, ARCHS = ("mnist", "fashion-mnist"), ("resnet", "fracdnn")


def _legend(ax: Axes) -> None:
    """A legend where something was drawn; an empty panel says so instead."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no runs of this kind in the study", ha="center", transform=ax.transAxes)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _mean(values: Iterable[float]) -> float:
    data = list(values)
    return statistics.fmean(data) if data else float("nan")


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _pick(views: Sequence[TrialView], **coords: object) -> list[TrialView]:
    return [v for v in views if v.grid and all(v.grid.get(k) == c for k, c in coords.items())]


def _curve(
    views: Sequence[TrialView], series: Callable[[TrialView], list[float]]
) -> tuple[list[float], list[float], list[float]]:
    """Mean, min and max over the trials (seeds), epoch by epoch."""
    rows = [series(v) for v in views if series(v)]
    if not rows:
        return [], [], []
    n = min(len(r) for r in rows)
    cols = [[r[i] for r in rows] for i in range(n)]
    return [_mean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def _plot_curve(
    ax: Axes,
    views: Sequence[TrialView],
    series: Callable[[TrialView], list[float]],
    label: str,
    style: str = "-",
) -> None:
    mean, low, high = _curve(views, series)
    if not mean:
        return
    epochs = list(range(1, len(mean) + 1))
    (line,) = ax.plot(epochs, mean, style, marker="o", label=f"{label} (n={len(views)})")
    ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.15)


BASE = {"tau": "trainable", "l1": False, "time_reg": "none"}


def _grid_figures(views: Sequence[TrialView], out: Path) -> list[Path]:
    files = []
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, sharex=True)
    for (i, dataset), (j, arch) in ((a, b) for a in enumerate(DATASETS) for b in enumerate(ARCHS)):
        ax = axes[i][j]
        base = "no-prune" if arch == "resnet" else "full"
        for T, style in ((1.0, "-"), (6.0, "--")):
            for tau in ("fixed", "trainable"):
                chosen = _pick(
                    views,
                    dataset=dataset,
                    arch=arch,
                    T=T,
                    tau=tau,
                    l1=False,
                    time_reg="none",
                    variant=base,
                )
                _plot_curve(ax, chosen, lambda v: v.test_history, f"{tau} tau, T={T:g}", style)
        ax.set_title(f"{arch}, {dataset}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        _legend(ax)
    fig.suptitle("Fixed against trainable step sizes (mean over seeds, band: min to max)")
    files.append(_save(fig, out / "accuracy.png"))

    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, sharex=True)
    for (i, dataset), (j, arch) in ((a, b) for a in enumerate(DATASETS) for b in enumerate(ARCHS)):
        ax = axes[i][j]
        base = "no-prune" if arch == "resnet" else "full"
        chosen = [
            v
            for v in _pick(views, dataset=dataset, arch=arch, T=1.0, variant=base, **BASE)
            if v.grid and v.grid["seed"] == 0
        ]
        for v in chosen[:1]:
            for block in range(v.depth):
                ax.plot(
                    range(1, len(v.tau_history) + 1),
                    [row[block] for row in v.tau_history],
                    marker="o",
                    label=f"tau_{block}",
                )
        ax.set_title(f"{arch}, {dataset}, T=1, seed 0")
        ax.set_xlabel("epoch")
        ax.set_ylabel("step size tau_l")
        _legend(ax)
    fig.suptitle("The step sizes over training")
    files.append(_save(fig, out / "taus.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    for dataset in DATASETS:
        coords = {
            "dataset": dataset,
            "arch": "resnet",
            "T": 1.0,
            "tau": "trainable",
            "l1": True,
            "time_reg": "none",
        }
        pruned, kept = (
            _pick(views, variant="prune", **coords),
            _pick(views, variant="no-prune", **coords),
        )
        _plot_curve(
            left,
            pruned,
            lambda v: [float(b) for b in v.blocks_before_pruning()],
            f"{dataset}, pruning",
        )
        _plot_curve(right, pruned, lambda v: v.epoch_seconds, f"{dataset}, pruning")
        _plot_curve(right, kept, lambda v: v.epoch_seconds, f"{dataset}, no pruning", "--")
    left.set_title("Active blocks (ResNet, T=1, l1 on)")
    left.set_xlabel("epoch")
    left.set_ylabel("active blocks after the epoch")
    right.set_title("Seconds per epoch")
    right.set_xlabel("epoch")
    right.set_ylabel("seconds")
    for ax in (left, right):
        _legend(ax)
    files.append(_save(fig, out / "pruning.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    for dataset in DATASETS:
        for variant, style in (("full", "-"), ("detached", "--")):
            chosen = _pick(views, dataset=dataset, arch="fracdnn", T=1.0, variant=variant, **BASE)
            _plot_curve(
                left,
                chosen,
                lambda v: v.test_history,
                f"{dataset}, {variant} memory gradient",
                style,
            )
    for offset, variant in ((-0.2, "full"), (0.2, "detached")):
        chosen = _pick(views, dataset="mnist", arch="fracdnn", T=1.0, variant=variant, **BASE)
        if chosen:
            depth = chosen[0].depth
            means = [
                _mean(v.tau_history[-1][b] for v in chosen if v.tau_history) for b in range(depth)
            ]
            right.bar([b + offset for b in range(depth)], means, width=0.4, label=variant)
    left.set_title("Fractional DNN: test accuracy")
    left.set_xlabel("epoch")
    left.set_ylabel("test accuracy")
    right.set_title("Final step sizes (mnist, mean over seeds)")
    right.set_xlabel("block l")
    right.set_ylabel("tau_l after the last epoch")
    right.set_yscale("log")
    for ax in (left, right):
        _legend(ax)
    files.append(_save(fig, out / "fracdnn_memory.png"))
    return files


def _grid_questions(views: Sequence[TrialView]) -> list[str]:
    lines = ["## Which T is best?", "", "Mean final test accuracy over seeds and all settings:", ""]
    lines += ["| dataset | network | taus | T = 1 | T = 6 |", "|---|---|---|---|---|"]
    for dataset in DATASETS:
        for arch in ARCHS:
            for tau in ("fixed", "trainable"):
                accs = [
                    _mean(
                        v.test_accuracy
                        for v in _pick(views, dataset=dataset, arch=arch, tau=tau, T=T)
                    )
                    for T in (1.0, 6.0)
                ]
                lines.append(f"| {dataset} | {arch} | {tau} | {accs[0]:.4f} | {accs[1]:.4f} |")
    lines += ["", "## l1 against the horizon penalty", ""]
    lines += [
        "Trainable taus, T = 1 and 6, both networks: mean final test accuracy, mean "
        "|sum(tau) - T| and mean blocks removed (ResNet with pruning):",
        "",
    ]
    lines += [
        "| regularisation | test accuracy | abs(sum(tau) - T) | blocks removed | trials |",
        "|---|---|---|---|---|",
    ]
    for label, l1, reg in (
        ("none", False, "none"),
        ("l1 only", True, "none"),
        ("horizon penalty only", False, "penalty"),
        ("l1 + penalty", True, "penalty"),
        ("dependent last tau", False, "dependent"),
    ):
        chosen = _pick(views, tau="trainable", l1=l1, time_reg=reg)
        gap = _mean(
            abs(sum(v.tau_history[-1]) - float(v.config.get("T", 1.0)))
            for v in chosen
            if v.tau_history
        )
        removed = _mean(v.blocks_removed for v in chosen if v.grid and v.grid["variant"] == "prune")
        lines.append(
            _row(
                label,
                f"{_mean(v.test_accuracy for v in chosen):.4f}",
                f"{gap:.4f}",
                f"{removed:.2f}",
                len(chosen),
            )
        )
    lines += ["", "## Does pruning change the gap between validation and test accuracy?", ""]
    lines += _gap_table(
        [v for v in views if v.arch == "resnet" and v.grid and v.grid["tau"] == "trainable"]
    )
    return lines


def _gap_table(views: Sequence[TrialView]) -> list[str]:
    lines = [
        "| runs | mean validation - test accuracy | mean test accuracy | trials |",
        "|---|---|---|---|",
    ]
    for label, chosen in (
        ("with blocks removed", [v for v in views if v.pruned]),
        ("no block removed", [v for v in views if not v.pruned]),
    ):
        lines.append(
            _row(
                label,
                f"{_mean(v.val_accuracy - v.test_accuracy for v in chosen):+.4f}",
                f"{_mean(v.test_accuracy for v in chosen):.4f}",
                len(chosen),
            )
        )
    return lines


def _objective(study: optuna.Study, index: int) -> Callable[[optuna.trial.FrozenTrial], float]:
    # The evaluator ranks parameters by how they lower the target: negate what is maximised.
    sign = -1.0 if study.directions[index] == optuna.study.StudyDirection.MAXIMIZE else 1.0

    def value(trial: optuna.trial.FrozenTrial) -> float:
        return sign * float(trial.values[index])

    return value


def _search_figures(study: optuna.Study, views: Sequence[TrialView], out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=FIGSIZE)
    feasible = [v for v in views if v.feasible]
    for pruned, marker, label in (
        (False, "o", "no block removed"),
        (True, "^", "blocks removed by pruning"),
    ):
        chosen = [v for v in feasible if bool(v.pruned) == pruned]
        ax.scatter(
            [v.active_params for v in chosen],
            [v.val_accuracy for v in chosen],
            marker=marker,
            alpha=0.6,
            label=label,
        )
    front = sorted((v for v in feasible if v.pareto), key=lambda v: v.active_params)
    ax.plot(
        [v.active_params for v in front],
        [v.val_accuracy for v in front],
        "k-",
        marker="s",
        mfc="none",
        label="Pareto front",
    )
    ax.set_xlabel("active parameters after pruning")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Pareto front of the feasible trials")
    ax.legend()
    files = [_save(fig, out / "pareto.png")]
    names = study.metric_names or [f"objective {i}" for i in range(len(study.directions))]
    fig, axes = plt.subplots(1, len(names), figsize=FIGSIZE, squeeze=False)
    for i, name in enumerate(names):
        ax = axes[0][i]
        try:
            with warnings.catch_warnings():  # it warns on any target; _objective set the sign
                warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator", UserWarning)
                importances = optuna.importance.get_param_importances(
                    study, target=_objective(study, i)
                )
        except (ValueError, RuntimeError) as e:  # too few trials or one parameter
            ax.text(0.5, 0.5, f"no importances: {e}", ha="center", wrap=True)
            importances = {}
        ax.barh(list(importances), list(importances.values()))
        ax.set_title(f"Parameter importance for {name}")
        ax.set_xlabel("importance (Optuna's default evaluator)")
        ax.set_ylabel("parameter")
    files.append(_save(fig, out / "importance.png"))
    return files


def _search_summary(views: Sequence[TrialView]) -> list[str]:
    feasible = [v for v in views if v.feasible]
    front = [v for v in feasible if v.pareto]
    pruned_front = [v for v in front if v.pruned]
    unpruned = [v for v in feasible if not v.pruned]
    lines = ["## The front", ""]
    lines.append(
        f"{len(views)} complete trials, {len(feasible)} feasible, {len(front)} on the Pareto "
        f"front; {len(pruned_front)} of those pruned blocks."
    )
    if pruned_front:
        removed = [v.params_removed for v in pruned_front]
        lines.append(
            f"Pruning removed {min(removed):.1%} to {max(removed):.1%} of the parameters on "
            "the front."
        )
    if unpruned and pruned_front:
        best = max(v.val_accuracy for v in unpruned)
        costs = [best - v.val_accuracy for v in pruned_front]
        lines.append(
            f"Accuracy cost against the best unpruned trial ({best:.4f}): {min(costs):+.4f} "
            f"to {max(costs):+.4f} (negative: the pruned network is better)."
        )
    lines += ["", "## Which T is best?", ""]
    with_t = sorted(
        (v for v in feasible if "T" in (v.params or {})), key=lambda v: float((v.params or {})["T"])
    )
    third = max(1, len(with_t) // 3)
    lines += ["| T range | mean validation accuracy | trials |", "|---|---|---|"]
    for part in (with_t[:third], with_t[third : 2 * third], with_t[2 * third :]):
        if part:
            lo, hi = float((part[0].params or {})["T"]), float((part[-1].params or {})["T"])
            lines.append(
                f"| {lo:.3g} - {hi:.3g} | {_mean(v.val_accuracy for v in part):.4f} | {len(part)} |"
            )
    lines += ["", "## l1 against the horizon penalty", ""]
    lines += [
        _row(
            "time regularisation",
            "l1 > 0",
            "mean validation accuracy",
            "mean blocks removed",
            "trials",
        ),
        "|---|---|---|---|---|",
    ]
    for reg in ("none", "penalty", "dependent"):
        for l1 in (False, True):
            chosen = [
                v
                for v in feasible
                if (v.params or {}).get("time_reg", "none") == reg
                and (float(v.config.get("l1", 0.0)) > 0) == l1
            ]
            if chosen:
                lines.append(
                    _row(
                        reg,
                        l1,
                        f"{_mean(v.val_accuracy for v in chosen):.4f}",
                        f"{_mean(v.blocks_removed for v in chosen):.2f}",
                        len(chosen),
                    )
                )
    lines += ["", "## Does pruning change the gap between validation and test accuracy?", ""]
    lines += _gap_table(feasible)
    return lines


def write_report(study: optuna.Study, out: Path) -> list[Path]:
    """Write the PNG figures and ``report.md`` into ``out``; put the study figures on the
    dashboard too. Returns the files written."""
    views = trial_views(study)
    if not views:
        raise ValueError(f"study {study.study_name!r} has no complete trial to report on")
    out.mkdir(parents=True, exist_ok=True)
    grid = REPRODUCE_ATTR in study.user_attrs
    figures = _grid_figures(views, out) if grid else _search_figures(study, views, out)
    kind = "reproduction of the papers' experiments" if grid else "hyperparameter search"
    lines = [f"# Study {study.study_name!r}: {kind}", ""]
    lines += [f"![{f.stem}]({f.name})" for f in figures] + [""]
    lines += _grid_questions(views) if grid else _search_summary(views)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    publish(study, study._storage)
    return [*figures, report]
