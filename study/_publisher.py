"""The publisher: a trial's note and the study's figures on its optuna-dashboard page, drawn at
a pace that keeps them under a few per cent of a worker's time. Drawing is a courtesy: a
failure is logged and never touches a trial."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import optuna

from tauopt.storage import StudyAccess, study_id
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
        now = self._last_trial = time.time()
        # The storage is asked only once the stamp seen last is old enough: no call per trial
        # while another worker's drawing is recent.
        if now - self._seen >= self._every and self._turn(before=now - self._every):
            self.figures()

    def last(self) -> None:
        """At the worker's end: redraw unless someone began to after its last trial."""
        if self._last_trial and self._turn(before=math.nextafter(self._last_trial, math.inf)):
            self.figures()

    def figures(self) -> None:
        """Redraw the study's figures now (the caller took the turn)."""
        start = time.monotonic()
        self._courtesy(lambda: publish(self.study, self.access))
        self._every = max(PUBLISH_EVERY, 20 * (time.monotonic() - start))

    def _turn(self, *, before: float) -> bool:
        """Whether this worker takes the turn to draw: the study's stamp is older than
        ``before`` and this worker replaced it, before anyone else (workers that finish
        together would each draw otherwise). Stamped before the drawing: the trials read
        then are at least as new as the stamp says."""
        try:
            now = time.time()
            taken, stamp = self.access.take_turn(study_id(self.study), FIGURES_AT_ATTR, now, before)
        except Exception as e:
            self.say(f"could not read when the figures were drawn ({type(e).__name__}: {e})")
            return False
        self._seen = max(self._seen, stamp)
        return taken

    def _courtesy(self, draw: Callable[[], None]) -> None:
        try:
            draw()
        except Exception as e:
            self.say(f"could not update the dashboard's figures ({type(e).__name__}: {e})")
