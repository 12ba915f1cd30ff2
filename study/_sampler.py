"""The workers' sampler: Optuna's TPE on a bounded window of the study's history.

With ``constant_liar`` (needed when several workers ask at once) TPE reads every trial of the
study from the database at every suggestion, uncached, and builds its estimators from all of
them: at 5,000 trials one ``ask`` with its suggestions took 0.28 s instead of 0.05 s, and the
cost keeps growing with the study. This sampler gives TPE the most recent ``window`` finished
trials (and every running one, for the constant liar) through the storage's cache, so a
suggestion costs the same in a study of 10,000 trials as in one of ``window``.

TPE also redoes, for every parameter of a trial, the work that depends only on the trials: the
filtering by state, the split into good and bad trials (a non-dominated sort with two
objectives) and a pass over each side's trials to pick out the parameter's values. Within one
``ask`` the trials are the same for every parameter (the study's cache holds them until the
next ``ask`` or ``tell``), so the window, each state filter, the split and one pass for the
values of every parameter are made once per trial and reused by its parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers._tpe import sampler as _tpe
from optuna.trial import FrozenTrial, TrialState

#: Finished trials TPE learns from. Its good ("below") set is the best tenth or so of them,
#: which a window of a thousand keeps large enough to model.
HISTORY_WINDOW = 1000

_Split = tuple[list[FrozenTrial], list[FrozenTrial]]
_FINISHED = frozenset(s for s in TrialState if s.is_finished())


class _RecentTrials:
    """``study`` as TPE sees it: the same, but ``_get_trials`` keeps only the latest finished
    trials and reads through the study's cache (which re-reads unfinished trials at each
    ``ask``). What it derives from one state of that cache is kept until the cache changes."""

    def __init__(self, study: optuna.Study, window: int) -> None:
        self._study, self._window = study, window
        self._source: list[FrozenTrial] | None = None  # the study's cached trials, by number
        self._recent: list[FrozenTrial] = []
        self._by_states: dict[tuple[int, ...] | None, list[FrozenTrial]] = {}
        self._splits: dict[tuple[int, bool], _Split] = {}
        # per list of trials (kept alive here, so its id stays its own): each parameter's
        # values, in the trials' order
        self._columns: dict[int, tuple[list[FrozenTrial], dict[str, list[Any]]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _refresh(self) -> None:
        trials = self._study._get_trials(deepcopy=False, use_cache=True)
        if trials is self._source:
            return
        self._source, self._by_states, self._splits, self._columns = trials, {}, {}, {}
        # The trials come by number: from the newest back to the window's oldest finished one,
        # then only the unfinished trials before it.
        seen, cut = 0, 0
        for index in range(len(trials) - 1, -1, -1):
            seen += trials[index].state in _FINISHED
            if seen == self._window:
                cut = index
                break
        else:
            self._recent = trials
            return
        older = [t for t in trials[:cut] if t.state not in _FINISHED]
        self._recent = older + trials[cut:]

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        self._refresh()
        key = None if states is None else tuple(s.value for s in TrialState if s in states)
        if key not in self._by_states:
            chosen = self._recent
            if states is not None:
                chosen = [t for t in chosen if t.state in states]
            self._by_states[key] = chosen
        trials = self._by_states[key]
        return copy.deepcopy(trials) if deepcopy else trials

    def split(self, sampler: WindowedTPESampler, trial: FrozenTrial) -> _Split:
        """TPE's good and bad trials for proposing ``trial``'s parameters (as
        ``TPESampler._sample`` makes them), made once for all of its parameters."""
        self._refresh()
        liar = sampler._constant_liar
        key = (trial.number, liar)
        if key not in self._splits:
            states = [TrialState.COMPLETE, TrialState.PRUNED]
            if liar:
                states.append(TrialState.RUNNING)
            trials = self._get_trials(deepcopy=False, states=states)
            if liar:
                trials = [t for t in trials if t.number != trial.number]
            n = sum(t.state != TrialState.RUNNING for t in trials)  # running ones are lies
            view: Any = self
            self._splits[key] = _tpe._split_trials(view, trials, sampler.gamma_of(self)(n))
        return self._splits[key]

    def values(self, trials: list[FrozenTrial], name: str) -> list[Any]:
        """``name``'s value in each trial of ``trials`` that has it, in order: one pass over
        ``trials`` serves every parameter."""
        cached = self._columns.get(id(trials))
        if cached is None or cached[0] is not trials:
            columns: dict[str, list[Any]] = {}
            for trial in trials:
                for key, value in trial.params.items():
                    columns.setdefault(key, []).append(value)
            cached = self._columns[id(trials)] = (trials, columns)
        return cached[1].get(name, [])


class WindowedTPESampler(optuna.samplers.TPESampler):
    """:class:`optuna.samplers.TPESampler` that models only the latest ``window`` finished
    trials (see the module's docstring). Keyword-only arguments as TPESampler's.

    Its proposals are TPESampler's own for a study no larger than the window (same seed, same
    trials: ``tests/test_sampler.py``); ``_sample`` is Optuna 5's, with the trials' split
    taken from the per-trial cache.
    """

    def __init__(self, *, window: int = HISTORY_WINDOW, **kwargs: Any) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        super().__init__(**kwargs)
        self._window = window
        self._view: _RecentTrials | None = None

    def _recent(self, study: optuna.Study | _RecentTrials) -> _RecentTrials:
        if isinstance(study, _RecentTrials):
            return study
        if self._view is None or self._view._study is not study:
            self._view = _RecentTrials(study, self._window)
        return self._view

    def gamma_of(self, study: Any) -> Any:
        """The size of the good set for ``n`` trials, as TPESampler chooses it."""
        if self._gamma is None:
            multi = len(study.directions) > 1
            self._gamma = _tpe.default_gamma_multiobjective if multi else _tpe.default_gamma
        return self._gamma

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        # The window also counts the startup trials (it never holds fewer than the study's
        # first ``window``), and the parameter's proposal reads it.
        view: Any = self._recent(study)
        return super().sample_independent(view, trial, param_name, param_distribution)

    def _get_internal_repr(
        self, trials: list[FrozenTrial], search_space: dict[str, BaseDistribution], study: Any
    ) -> dict[str, np.ndarray]:
        # TPESampler's, for the one parameter an independent suggestion asks for, from the
        # values the view collected in one pass (a trial's params of a finished or running
        # trial: not multivariate, so no relative params stand in system attributes).
        if self._multivariate or len(search_space) != 1 or not isinstance(study, _RecentTrials):
            return super()._get_internal_repr(trials, search_space, study)
        ((name, dist),) = search_space.items()
        return {name: np.asarray([dist.to_internal_repr(v) for v in study.values(trials, name)])}

    def _sample(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        view = self._recent(study)
        below, above = view.split(self, trial)
        board: Any = view
        mpe_below = self._build_parzen_estimator(board, search_space, below, handle_below=True)
        mpe_above = self._build_parzen_estimator(board, search_space, above, handle_below=False)
        samples_below = mpe_below.sample(self._rng.rng, self._n_ei_candidates)
        acquisition = self._compute_acquisition_func(samples_below, mpe_below, mpe_above)
        proposal = optuna.samplers.TPESampler._compare(samples_below, acquisition)
        result: dict[str, Any] = {
            name: dist.to_external_repr(proposal[name]) for name, dist in search_space.items()
        }
        return result
