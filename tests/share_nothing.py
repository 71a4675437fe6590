"""A code location whose steps share nothing but the store and the instance, as Kubernetes pods do.

dagster-k8s's k8s_job_executor is Dagster's StepDelegatingExecutor with a step handler that starts
each step as a Job running `dagster api execute_step`: a fresh process in a fresh container, whose
only links to the other steps are the instance (PostgreSQL) and whatever the code reaches over the
network (S3). This handler starts the same command as a local process with its own empty working
folder, HOME and TMPDIR and an environment of a few named variables (those of the pod spec:
KUN_CONFIG, the S3 credentials), so a step that reads or writes a local path another step made
fails or leaves a trace outside its folder (tests/test_s3.py looks).

Load it with KUN_CONFIG and KUN_TEST_PODS (the folder the steps' folders are made in) set:
`dagster asset materialize -m tests.share_nothing ...` with PYTHONPATH at the repo (the image).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster._core.definitions.executor_definition import multiple_process_executor_requirements
from dagster._core.events import DagsterEvent
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.step_delegating import CheckStepHealthResult, StepDelegatingExecutor, StepHandler, StepHandlerContext
from dagster_shared.record import copy

from kun_dagster.definitions import build_definitions

# What a pod's spec passes in (env, env_secrets); nothing else of this process's environment reaches a step.
PASSED = ("PATH", "PYTHONPATH", "KUN_CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "OMP_NUM_THREADS")
PASSED += ("TOKENIZERS_PARALLELISM", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_OMP_THREADS_BIND", "HF_HUB_OFFLINE", "LANG")


class PodLikeStepHandler(StepHandler):
    def __init__(self, pods: Path):
        super().__init__()
        self.pods = pods
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def name(self) -> str:
        return "PodLikeStepHandler"

    @staticmethod
    def _key(ctx: StepHandlerContext) -> str:
        (key,) = ctx.execute_step_args.step_keys_to_execute
        return key

    def launch_step(self, ctx: StepHandlerContext) -> Iterator[DagsterEvent]:
        key = self._key(ctx)
        pod = self.pods / f"{ctx.execute_step_args.run_id[:8]}-{key.replace('/', '_')}"
        for d in ("home", "work", "tmp"):
            (pod / d).mkdir(parents=True)
        env = {k: os.environ[k] for k in PASSED if k in os.environ}
        env |= {"HOME": str(pod / "home"), "TMPDIR": str(pod / "tmp")}
        env |= {e["name"]: e["value"] for e in ctx.execute_step_args.get_command_env()}
        args = ctx.execute_step_args.get_command_args(skip_serialized_namedtuple=True)
        with open(pod / "step.log", "wb") as log:  # the process keeps its own descriptor
            self.procs[key] = subprocess.Popen(args, cwd=pod / "work", env=env, stdout=log, stderr=subprocess.STDOUT)
        yield DagsterEvent.step_worker_starting(ctx.get_step_context(key), message=f'Step "{key}" in {pod}', metadata={})

    def check_step_health(self, ctx: StepHandlerContext) -> CheckStepHealthResult:
        code = self.procs[self._key(ctx)].poll()
        return CheckStepHealthResult.healthy() if code in (None, 0) else CheckStepHealthResult.unhealthy(f"exit code {code}")

    def terminate_step(self, ctx: StepHandlerContext) -> Iterator[DagsterEvent]:
        if proc := self.procs.get(self._key(ctx)):
            proc.kill()
        yield from ()


@dg.executor(name="pod_like", requirements=multiple_process_executor_requirements())
def pod_like_executor(init_context) -> StepDelegatingExecutor:
    handler = PodLikeStepHandler(Path(os.environ["KUN_TEST_PODS"]))
    return StepDelegatingExecutor(handler, retries=RetryMode.DISABLED, max_concurrent=2, check_step_health_interval_seconds=1)


if "KUN_CONFIG" in os.environ:  # loaded as the code location (tests/test_s3.py imports PASSED without a config)
    defs = copy(build_definitions(), executor=pod_like_executor)
