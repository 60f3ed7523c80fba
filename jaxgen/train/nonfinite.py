"""What the loop does about a step the train step skipped for non-finite values.

The train step never lets a non-finite value into the state (it keeps the old
state and reports `nonfinite_cause`). The loop sees each step's metrics one
step late and decides: `abort` stops the run at the first such step, without
saving; `skip` warns, records it, and stops after
`train.max_consecutive_nonfinite` skipped steps in a row (a run that skips
everything is not training).
"""

from __future__ import annotations

import logging

from jaxgen.config import TrainConfig
from jaxgen.errors import NonFiniteError
from jaxgen.train.step import NONFINITE_CAUSES

log = logging.getLogger("jaxgen")


class NonFiniteWatch:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.in_a_row = 0

    def check(self, step: int, cause: int, last_saved: int | None) -> tuple[bool, NonFiniteError | None]:
        """(whether `step` was skipped, the error that stops the run, if it must stop)."""
        if not cause:
            self.in_a_row = 0
            return False, None
        self.in_a_row += 1
        what = NONFINITE_CAUSES[cause]
        kept = f"checkpoint {last_saved} is kept" if last_saved is not None else "no checkpoint was saved"
        if self.cfg.nonfinite == "abort":
            return True, NonFiniteError(f"step {step}: non-finite {what}; stopped without saving "
                                        f"(train.nonfinite=abort); {kept}")
        limit = self.cfg.max_consecutive_nonfinite
        if self.in_a_row >= limit:
            return True, NonFiniteError(
                f"steps {step - limit + 1}-{step}: {limit} updates in a row were skipped as non-finite (the last "
                f"for its {what}; train.max_consecutive_nonfinite={limit}); stopped; {kept}")
        log.warning("step %d: non-finite %s; the update was skipped (%d in a row; the run stops at %d)",
                    step, what, self.in_a_row, limit)
        return True, None
