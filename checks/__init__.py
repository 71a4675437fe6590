"""Asset checks (Pandera schemas as blocking checks, statistical WARN checks) and the alert sensors."""

from .alerts import check_failure_alerts, run_failure_alerts
from .quality import gate, log_failures, schema_check, specs, warn_results

__all__ = ["check_failure_alerts", "gate", "log_failures", "run_failure_alerts", "schema_check", "specs", "warn_results"]
