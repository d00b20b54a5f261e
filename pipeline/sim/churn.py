"""Churn scripts: when nodes join, crash, leave and restart. Pure.

A script is a list of ``ChurnEvent(at, action)``; which node crashes, leaves or restarts
is chosen when the event happens (by the simulation's rng), so a script does not depend on
the ids in the run. ``poisson_churn`` draws a script with exponential gaps.

- ``join``: a new node (new id, new address) joins through a few live nodes.
- ``crash``: a live node stops without a word; datagrams to it are lost.
- ``leave``: a live node leaves gracefully (``OverlayNode.leave``).
- ``restart``: a crashed node comes back with the same id and address, and joins again.
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Mapping


class ChurnAction(enum.StrEnum):
    JOIN = "join"
    CRASH = "crash"
    LEAVE = "leave"
    RESTART = "restart"


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class ChurnEvent:
    at: float
    action: ChurnAction


DEFAULT_MIX: Mapping[ChurnAction, float] = {
    ChurnAction.JOIN: 1.0,
    ChurnAction.CRASH: 1.0,
    ChurnAction.LEAVE: 1.0,
    ChurnAction.RESTART: 1.0,
}


def poisson_churn(
    rng: random.Random,
    *,
    start: float,
    stop: float,
    rate: float,
    mix: Mapping[ChurnAction, float] = DEFAULT_MIX,
) -> list[ChurnEvent]:
    """Churn events between start and stop, ``rate`` a second on average, the action of
    each drawn with the weights in ``mix``."""
    if rate <= 0:
        return []
    actions = list(mix)
    weights = [mix[a] for a in actions]
    events = []
    t = start + rng.expovariate(rate)
    while t < stop:
        events.append(ChurnEvent(t, rng.choices(actions, weights)[0]))
        t += rng.expovariate(rate)
    return events
