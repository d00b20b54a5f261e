"""A discrete-event simulator for the sans-I/O cores, in virtual time. Pure.

- ``loop``: ``Simulator``, the event loop that drives any core at an address.
- ``network``: ``Network``, per-pair latency, jitter, loss and partitions.
- ``churn``: churn scripts (joins, crashes, graceful leaves, restarts).
- ``overlay``: ``OverlaySim``, overlay nodes in the simulator and the invariants checked
  on them (successor and predecessor right; every node reaches every other).
- ``dht`` (imported on its own): ``DhtSim``, overlay nodes each with a DHT on top.

One seed is the only source of variation: a run replays exactly.
"""

from pipeline.sim.churn import ChurnAction, ChurnEvent, poisson_churn
from pipeline.sim.loop import Core, Simulator
from pipeline.sim.network import ConstantLatency, LogNormalLatency, Network, UniformLatency
from pipeline.sim.overlay import IntAddressCodec, OverlaySim, RoutingReport, SimNode, Traffic

__all__ = [
    "ChurnAction",
    "ChurnEvent",
    "ConstantLatency",
    "Core",
    "IntAddressCodec",
    "LogNormalLatency",
    "Network",
    "OverlaySim",
    "RoutingReport",
    "SimNode",
    "Simulator",
    "Traffic",
    "UniformLatency",
    "poisson_churn",
]
