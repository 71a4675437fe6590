"""The tests' pace for Dagster's daemon. tests/conftest.py's `dagster_dev` puts this folder on the
PYTHONPATH of `dagster dev`, so Python imports this module at the start of each of its processes.

Dagster's backfill daemon sleeps DEFAULT_DAEMON_INTERVAL_SECONDS (30 s) between iterations, a
constant with no setting in dagster.yaml; a backfill of one run waits one to three iterations. In
the daemon process of a test it is KUN_TEST_DAEMON_INTERVAL seconds instead; everything else the
daemon does is as users run it."""

import os
import sys

if (_interval := os.environ.get("KUN_TEST_DAEMON_INTERVAL")) and "dagster._daemon" in sys.orig_argv:
    import dagster._daemon.controller

    dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS = float(_interval)
