"""One progress bar for a whole search, however many ``study.optimize`` calls it takes.

Optuna's own bar is per ``optimize`` call, and a search makes several (the warm starts, each
bisection probe, then the sampler), so it would show as several bars that each start at zero
and know nothing of resumed trials. This bar counts the study's finished trials from the
start, so a resumed search starts where it left off, and shows the best feasible cost so far
in the objective's unit.
"""

from __future__ import annotations

import sys
from types import TracebackType

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

__all__ = ["SearchProgress", "cost_text"]

_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def cost_text(objective: str, value: float) -> str:
    """A cost with its unit: latency attributes are seconds, shown in ms."""
    if objective == "latency":
        return f"{value * 1e3:.3f} ms"
    return f"{value:,.0f} {'MACs' if objective == 'macs' else 'params'}"


class SearchProgress:
    """An Optuna callback that drives one tqdm bar over the study's ``n_trials``."""

    def __init__(self, study: optuna.Study, *, n_trials: int, objective: str, enabled: bool) -> None:
        self.objective = objective
        finished = study.get_trials(deepcopy=False, states=_FINISHED)
        self.best: tuple[float, int] | None = None
        for trial in finished:
            self._consider(trial)
        self.resumed = len(finished)
        label = f"search ({self.resumed} resumed)" if self.resumed else "search"
        self.bar = tqdm(total=n_trials, initial=min(self.resumed, n_trials), desc=label, unit="trial",
                        disable=not enabled, file=sys.stderr, dynamic_ncols=True, leave=True)
        self._show_best()

    def _consider(self, trial: FrozenTrial) -> bool:
        cost = trial.user_attrs.get(self.objective)
        if trial.state != TrialState.COMPLETE or trial.user_attrs.get("feasible") is not True or cost is None:
            return False
        if self.best is None or cost < self.best[0]:
            self.best = (float(cost), trial.number)
            return True
        return False

    def _show_best(self) -> None:
        text = "no feasible trial yet" if self.best is None else \
            f"best {cost_text(self.objective, self.best[0])} (trial {self.best[1]})"
        self.bar.set_postfix_str(text, refresh=False)

    def __call__(self, _study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state not in _FINISHED:
            return
        if self._consider(trial):
            self._show_best()
        if self.bar.n < (self.bar.total or 0):
            self.bar.update(1)

    def __enter__(self) -> SearchProgress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.bar.close()
