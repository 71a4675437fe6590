"""Asset checks (Pandera schemas as blocking checks, statistical WARN checks), the alert sensors, and the
recovery of runs whose worker died (recovery.py)."""

from .alerts import check_failure_alerts, run_failure_alerts
from .quality import gate, log_failures, schema_check, specs, warn_results
from .recovery import dead_run_recovery

__all__ = [
    "check_failure_alerts",
    "dead_run_recovery",
    "gate",
    "log_failures",
    "run_failure_alerts",
    "schema_check",
    "specs",
    "warn_results",
]
