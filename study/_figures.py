"""The study's own figures on its optuna-dashboard page (optuna-dashboard's API: no fork)."""

from __future__ import annotations

from collections.abc import Sequence

import optuna
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tauopt.storage import (
    StudyAccess,
    figure_attrs,
    first_note_attrs,
    study_id,
    trial_id,
)
from tauopt.study._views import TrialView, trial_views

#: Fixed ids: each publication replaces the figure instead of adding one.
FIGURE_IDS = ("tauopt-pruning-accuracy", "tauopt-taus", "tauopt-epoch-seconds")
CURVES_ID = "tauopt-learning-curves"
_MAX_LINES = 12  # trials drawn as lines; more make the figure unreadable
#: One colour per trial, none reused among the :data:`_MAX_LINES` drawn (plotly's default
#: palette has ten, so the eleventh trial took the first one's colour).
_TRIAL_COLOURS = plotly.colors.qualitative.Dark24
#: One line style per block; a deeper network reuses them in turn.
_BLOCK_DASHES = ("solid", "dot", "dash", "longdash", "dashdot", "longdashdot")


def pruning_accuracy(views: Sequence[TrialView]) -> go.Figure:
    """Validation accuracy against the share of parameters pruning removed."""
    fig = go.Figure()
    groups = sorted({v.record.blocks_removed for v in views})
    for removed in groups:
        chosen = [v for v in views if v.record.blocks_removed == removed and v.feasible]
        if chosen:
            fig.add_trace(
                go.Scatter(
                    x=[100 * v.record.params_removed for v in chosen],
                    y=[v.record.final_val_accuracy for v in chosen],
                    mode="markers",
                    marker={
                        "size": [13 if v.pareto else 8 for v in chosen],
                        "line": {"width": [2 if v.pareto else 0 for v in chosen]},
                    },
                    name=f"{removed} block{'s' if removed != 1 else ''} removed",
                    text=[
                        f"trial {v.number}{' (Pareto-optimal)' if v.pareto else ''}" for v in chosen
                    ],
                )
            )
    infeasible = [v for v in views if not v.feasible]
    if infeasible:
        fig.add_trace(
            go.Scatter(
                x=[100 * v.record.params_removed for v in infeasible],
                y=[v.record.final_val_accuracy for v in infeasible],
                mode="markers",
                marker={"color": "lightgrey", "symbol": "x"},
                name="infeasible (below min_val_accuracy)",
                text=[f"trial {v.number}" for v in infeasible],
            )
        )
    if not any(
        v.record.final_val_accuracy == v.record.final_val_accuracy for v in views
    ):  # all NaN, or none
        _say_why_empty(
            fig,
            "no trial with a validation accuracy yet"
            if not views
            else "these trials hold out no validation images<br>(the papers' runs do not):"
            "<br>their test accuracy is in the papers' figure",
        )
    fig.update_layout(
        title="Accuracy against what pruning removed (large markers: Pareto-optimal)",
        xaxis_title="parameters removed by pruning (% of the unpruned network)",
        yaxis_title="validation accuracy",
        legend_title="blocks removed",
    )
    return fig


def taus_over_epochs(views: Sequence[TrialView]) -> go.Figure:
    """Every step size over the epochs, for the Pareto-optimal trials: a colour per trial, a
    line style per block."""
    fig = go.Figure()
    front = sorted((v for v in views if v.pareto), key=lambda v: -v.record.final_val_accuracy)[
        :_MAX_LINES
    ]
    for i, v in enumerate(front):
        epochs = list(range(1, len(v.record.history.taus) + 1))
        for block in range(v.record.config.depth):
            fig.add_trace(
                go.Scatter(
                    x=epochs,
                    y=[row[block] if block < len(row) else 0.0 for row in v.record.history.taus],
                    mode="lines+markers",
                    line={
                        "color": _TRIAL_COLOURS[i % len(_TRIAL_COLOURS)],
                        "dash": _BLOCK_DASHES[block % len(_BLOCK_DASHES)],
                    },
                    name=f"trial {v.number}",
                    legendgroup=f"trial {v.number}",
                    showlegend=block == 0,
                    hovertemplate=f"trial {v.number}, tau_{block}: %{{y:.4g}} after epoch "
                    "%{x}<extra></extra>",
                )
            )
    depth = max((v.record.config.depth for v in front), default=0)
    for block in range(min(depth, len(_BLOCK_DASHES))):  # the line styles' key
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                line={"color": "grey", "dash": _BLOCK_DASHES[block]},
                name=f"tau_{block}"
                + "".join(f", tau_{b}" for b in range(block, depth, len(_BLOCK_DASHES))[1:]),
                legendgroup="blocks",
                legendgrouptitle_text="line style: block",
            )
        )
    fig.update_layout(
        title="Step sizes over epochs of the Pareto-optimal trials (a colour per trial)",
        xaxis_title="epoch",
        yaxis_title="tau_l (0 once the block is removed)",
    )
    _whole_epochs(fig, max((len(v.record.history.taus) for v in front), default=0))
    return fig


def _say_why_empty(fig: go.Figure, text: str) -> None:
    """A figure with nothing to draw says why, where its points would be."""
    fig.add_annotation(
        text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False, font={"size": 13}
    )


def _whole_epochs(fig: go.Figure, epochs: int) -> None:
    """A tick per epoch where there are few: plotly would mark 0.5 between two."""
    if epochs <= 20:
        fig.update_xaxes(dtick=1)


def epoch_seconds(views: Sequence[TrialView]) -> go.Figure:
    """Seconds per epoch of the trials that pruned, with their pruning epochs marked."""
    fig = go.Figure()
    pruned = sorted(
        (v for v in views if v.record.history.pruned), key=lambda v: -v.record.params_removed
    )[:_MAX_LINES]
    for i, v in enumerate(pruned):
        blocks = v.record.history.blocks_before_pruning()
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(v.record.history.epoch_seconds) + 1)),
                y=v.record.history.epoch_seconds,
                mode="lines+markers",
                line={"color": _TRIAL_COLOURS[i % len(_TRIAL_COLOURS)]},
                name=f"trial {v.number} ({v.record.params_removed:.0%} removed)",
                text=[f"{b} blocks trained in this epoch" for b in blocks],
            )
        )
    if not pruned:
        _say_why_empty(
            fig,
            "no trial has removed a block yet:<br>a line per trial that pruned will show here",
        )
    unpruned = [
        s for v in views if not v.record.history.pruned for s in v.record.history.epoch_seconds
    ]
    if unpruned:
        fig.add_hline(
            y=sum(unpruned) / len(unpruned),
            line_dash="dot",
            annotation_text="mean of the trials without pruning",
        )
    fig.update_layout(
        title="Seconds per epoch before and after pruning (pruning runs between epochs)",
        xaxis_title="epoch",
        yaxis_title="seconds per epoch",
    )
    _whole_epochs(fig, max((len(v.record.history.epoch_seconds) for v in views), default=0))
    return fig


def learning_curves(views: Sequence[TrialView]) -> go.Figure:
    """Test accuracy per epoch of a ``tauopt reproduce`` grid, fixed against trainable taus
    with nothing else on, the mean over seeds: one panel per network and dataset."""
    panels = sorted(
        {(v.record.point.arch, v.record.point.dataset) for v in views if v.record.point}
    )
    groups: dict[tuple[str, str, str, float], list[list[float]]] = {}
    for v in views:
        p = v.record.point
        plain = not p.l1 and not p.horizon_weight and not p.prunes
        if plain and p.last_tau == "free" and v.record.history.test_accuracy:
            key = (p.arch, p.dataset, p.taus, p.T)
            groups.setdefault(key, []).append(v.record.history.test_accuracy)
    cols = min(2, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig = make_subplots(
        rows=rows, cols=cols, subplot_titles=[f"{a}, {d}" for a, d in panels] or [""]
    )
    for (arch, dataset, taus, T), runs in sorted(groups.items()):
        n = min(len(r) for r in runs)
        at = panels.index((arch, dataset))
        fig.add_trace(
            go.Scatter(
                x=list(range(1, n + 1)),
                y=[sum(r[i] for r in runs) / len(runs) for i in range(n)],
                mode="lines" if n > 1 else "markers",  # one epoch: a line of one point is none
                line={"dash": "solid" if taus == "trainable" else "dot"},
                name=f"{taus} taus, T={T:g}",
                legendgroup=f"{taus} taus, T={T:g}",
                showlegend=at == 0,
                hovertext=f"{arch}, {dataset}: {len(runs)} seeds",
            ),
            row=at // cols + 1,
            col=at % cols + 1,
        )
    fig.update_layout(
        title="Fixed against trainable taus: test accuracy per epoch (mean over seeds)",
        legend_title="dotted: fixed taus",
    )
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="test accuracy", col=1)  # beside the second panel it crowds
    _whole_epochs(fig, max((len(r) for runs in groups.values() for r in runs), default=0))
    return fig


def publish(study: optuna.Study, access: StudyAccess) -> None:
    """Draw the study's figures from its trials and save them to its dashboard page."""
    views = trial_views(study)
    figures = [pruning_accuracy(views), taus_over_epochs(views), epoch_seconds(views)]
    ids = list(FIGURE_IDS)
    if any(
        v.record.point for v in views
    ):  # a `tauopt reproduce` study: the papers' main figure too
        figures.append(learning_curves(views))
        ids.append(CURVES_ID)
    for figure_id, figure in zip(ids, figures, strict=True):
        save_figure(study, access, figure, figure_id)


def save_figure(
    study: optuna.Study, access: StudyAccess, figure: go.Figure, figure_id: str
) -> None:
    """``optuna_dashboard.save_plotly_graph_object(study, figure, graph_object_id=...)`` in
    one transaction: the same keys and chunks, but one commit instead of one per chunk (a
    figure of 5,000 trials is a hundred), and without reading every system attribute of the
    study (all its notes) to find the chunks of the figure's previous, longer version."""
    chunks, prefix = figure_attrs(figure.to_json(), figure_id)
    access.set_study_system_attrs(study_id(study), chunks, clear_prefix=prefix)


def write_trial_note(
    access: StudyAccess, study: optuna.Study, trial: optuna.Trial, body: str
) -> None:
    """Set the optuna-dashboard note of ``trial``, which has none yet, in one transaction.

    ``optuna_dashboard.save_note`` reads every system attribute of the study (all notes and
    figures) to find the next version, and its helper reads them all again to clear older
    chunks: its cost grows with the study. A worker notes each trial once, right after the
    trial finished, so the note is version 1 and there is nothing to clear. The body and the
    version commit together: a reader never sees a version without its text.
    """
    attrs = first_note_attrs(body, trial_id(trial))
    access.set_study_system_attrs(study_id(study), attrs)
