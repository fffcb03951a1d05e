"""Runtime monitoring of generation: watch chosen layers, alarm at a loop's onset, intervene locally."""

from .pillar_monitor import MonitorTrace, PillarMonitor
from .statistics import STATISTICS, AlarmRule, AlarmState, replay

__all__ = ["STATISTICS", "AlarmRule", "AlarmState", "MonitorTrace", "PillarMonitor", "replay"]
