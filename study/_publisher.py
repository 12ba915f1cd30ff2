"""The publisher: a trial's note and the study's figures on its optuna-dashboard page, drawn at
a pace that keeps them under a few per cent of a worker's time. Drawing is a courtesy: a
failure is logged and never touches a trial."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from tauopt.storage import StudyAccess
from tauopt.study._figures import publish, write_trial_note
from tauopt.study._record import FIGURES_AT_ATTR, TrialRecord
from tauopt.study._views import trial_note, view_of

#: Seconds between two redrawings of the study's figures by one worker: small next to a trial,
#: and the figures never lag far behind.
PUBLISH_EVERY = 30.0


class Publisher:
    """Notes every completed trial and redraws the study's figures: after the study's first
    completed trial, then whenever :data:`PUBLISH_EVERY` seconds (or 20 times the last drawing's
    time, which grows with the study) have passed since any worker of the study began to draw
    them, and once more when the worker ends if nobody has drawn them since its last trial.
    Hundreds of workers thus redraw in turn, not each on its own."""

    def __init__(
        self, study: optuna.Study, access: StudyAccess, say: Callable[[str], None]
    ) -> None:
        self.study, self.access, self.say = study, access, say
        self._every = PUBLISH_EVERY
        self._last_trial = 0.0  # when this worker last booked a completed trial (Unix time)
        self._seen = 0.0  # the latest drawing stamp seen: stamps only grow, so a lower bound

    def trial(self, trial: optuna.Trial, record: TrialRecord, *, feasible: bool) -> None:
        """Note ``trial`` and, if it is the study's turn, redraw the figures."""
        view = view_of(trial.number, record, feasible=feasible, params=dict(trial.params))
        self._courtesy(lambda: write_trial_note(self.access, self.study, trial, trial_note(view)))
        self._last_trial = time.time()
        # The stamp seen last is read again only once it is old enough: no storage call per
        # trial while another worker's drawing is recent.
        if (
            time.time() - self._seen >= self._every
            and time.time() - self._drawn_at() >= self._every
        ):
            self.figures()

    def last(self) -> None:
        """At the worker's end: redraw unless someone began to after its last trial."""
        if self._last_trial and self._drawn_at() <= self._last_trial:
            self.figures()

    def figures(self) -> None:
        """Redraw the study's figures now."""
        start = time.monotonic()
        # Stamped first: the trials read below are at least as new as the stamp says.
        self._seen = time.time()
        self._courtesy(lambda: self.study.set_user_attr(FIGURES_AT_ATTR, self._seen))
        self._courtesy(lambda: publish(self.study, self.access))
        self._every = max(PUBLISH_EVERY, 20 * (time.monotonic() - start))

    def _drawn_at(self) -> float:
        try:
            self._seen = max(self._seen, float(self.study.user_attrs.get(FIGURES_AT_ATTR, 0.0)))
            return self._seen
        except Exception as e:
            self.say(f"could not read when the figures were drawn ({type(e).__name__}: {e})")
            return 0.0

    def _courtesy(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as e:
            self.say(f"could not update the dashboard's figures ({type(e).__name__}: {e})")
