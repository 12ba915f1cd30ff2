"""The publisher: a trial's note and the study's figures on its optuna-dashboard page, drawn at
a pace that keeps them under a few per cent of a worker's time. Drawing is a courtesy: a
failure is logged and never touches a trial."""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from tauopt.storage import StudyAccess
from tauopt.study._figures import publish, write_trial_note
from tauopt.study._record import TrialRecord
from tauopt.study._views import trial_note, view_of

#: Seconds between two redrawings of the study's figures by one worker: small next to a trial,
#: and the figures never lag far behind.
PUBLISH_EVERY = 30.0


class Publisher:
    """Notes every completed trial; redraws the study's figures after the first one, then at
    most every :data:`PUBLISH_EVERY` seconds (or 20 times the last drawing's time, which
    grows with the study), and once more when the worker ends."""

    def __init__(
        self, study: optuna.Study, access: StudyAccess, say: Callable[[str], None]
    ) -> None:
        self.study, self.access, self.say = study, access, say
        self._published = -PUBLISH_EVERY  # the first completed trial publishes the figures
        self._every = PUBLISH_EVERY

    def trial(self, trial: optuna.Trial, record: TrialRecord, *, feasible: bool) -> None:
        """Note ``trial`` and, if it is time, redraw the figures."""
        view = view_of(trial.number, record, feasible=feasible, params=dict(trial.params))
        self._courtesy(lambda: write_trial_note(self.access, self.study, trial, trial_note(view)))
        if time.monotonic() - self._published >= self._every:
            self.figures()

    def figures(self) -> None:
        """Redraw the study's figures now."""
        start = time.monotonic()
        self._courtesy(lambda: publish(self.study, self.access))
        self._published = time.monotonic()
        self._every = max(PUBLISH_EVERY, 20 * (self._published - start))

    def _courtesy(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as e:
            self.say(f"could not update the dashboard's figures ({type(e).__name__}: {e})")
