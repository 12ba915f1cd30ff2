"""The workers' sampler: Optuna's TPE on a bounded window of the study's history.

With ``constant_liar`` (needed when several workers ask at once) TPE reads every trial of the
study from the database at every suggestion, uncached, and builds its estimators from all of
them: at 5,000 trials one ``ask`` with its suggestions took 0.28 s instead of 0.05 s, and the
cost keeps growing with the study. This sampler gives TPE the most recent ``window`` finished
trials (and every running one, for the constant liar) through the storage's cache, so a
suggestion costs the same in a study of 10,000 trials as in one of ``window``.

TPE also redoes, for every parameter of a trial, the work that depends only on the trials: the
filtering by state and the split into good and bad trials (a non-dominated sort with two
objectives). Within one ``ask`` the trials are the same for every parameter (the study's cache
holds them until the next ``ask`` or ``tell``), so the window, each state filter and the split
are made once per trial and reused by its parameters.
"""

from __future__ import annotations

import copy
from collections.abc import Container
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers._tpe import sampler as _tpe
from optuna.trial import FrozenTrial, TrialState

#: Finished trials TPE learns from. Its good ("below") set is the best tenth or so of them,
#: which a window of a thousand keeps large enough to model.
HISTORY_WINDOW = 1000

_Split = tuple[list[FrozenTrial], list[FrozenTrial]]


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

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _refresh(self) -> None:
        trials = self._study._get_trials(deepcopy=False, use_cache=True)
        if trials is self._source:
            return
        self._source, self._by_states, self._splits = trials, {}, {}
        finished = [t for t in trials if t.state.is_finished()]
        if len(finished) <= self._window:
            self._recent = trials
            return
        oldest_kept = finished[-self._window].number
        self._recent = [t for t in trials if not t.state.is_finished() or t.number >= oldest_kept]

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
