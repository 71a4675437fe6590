"""The benchmarks users compare: Kun reported C-Eval and CMMLU on its fine-tuned model. Here the
evaluation's models (seeds only, seeds + release) run lm-evaluation-harness tasks, the harness's own
task format and scoring, with the hub off: the tasks and their data come from local disk
(evaluation.benchmarks.include_path, or the datasets cache), never from the network at run time.
"""

from __future__ import annotations

import contextlib
import logging
import os

from .config import KunConfig

log = logging.getLogger(__name__)

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
METRICS = ("acc", "acc_norm")  # what a multiple-choice task (C-Eval, CMMLU) reports


class BenchmarkError(RuntimeError):
    """The harness is missing, or a task cannot be found or read offline."""


@contextlib.contextmanager
def _offline():
    before = {k: os.environ.get(k) for k in OFFLINE}
    os.environ.update(OFFLINE)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(model_dir: str, cfg: KunConfig) -> dict[str, dict]:
    """Each task of evaluation.benchmarks on the checkpoint: {task: {acc, acc_stderr, acc_norm, ..., n}}
    (a group such as cmmlu also reports its subtasks). Read by the harness's transformers model,
    on the GPU where there is one."""
    b = cfg.evaluation.benchmarks
    try:
        import lm_eval
        import torch
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise BenchmarkError(f"evaluation.benchmarks needs lm-evaluation-harness: pip install 'kun-dagster[eval]' ({e})") from e
    with _offline():
        manager = TaskManager(include_path=b.include_path) if b.include_path else TaskManager()
        unknown = [t for t in b.tasks if t not in manager.all_tasks]
        if unknown:
            raise BenchmarkError(f"evaluation.benchmarks: no task {unknown} in the harness or under include_path {b.include_path}")
        try:
            out = lm_eval.simple_evaluate(
                model="hf",
                model_args=f"pretrained={model_dir},dtype={b.dtype}",
                tasks=list(b.tasks),
                task_manager=manager,
                num_fewshot=b.num_fewshot,
                limit=b.limit,
                batch_size=b.batch_size,
                device="cuda" if torch.cuda.is_available() else "cpu",
                random_seed=cfg.evaluation.seed,
                numpy_random_seed=cfg.evaluation.seed,
                torch_random_seed=cfg.evaluation.seed,
                log_samples=False,
            )
        except Exception as e:  # noqa: BLE001 - a dataset not on disk, a broken task file: said with the task
            raise BenchmarkError(f"evaluation.benchmarks {list(b.tasks)} on {model_dir}: {type(e).__name__}: {e}") from e
    return {task: _figures(r, out.get("n-samples", {}).get(task, {})) for task, r in out["results"].items()}


def _figures(result: dict, samples: dict) -> dict:
    """A task's metrics as the harness names them ("acc,none") without the filter suffix."""
    got = {}
    for key, value in result.items():
        metric, _, _ = key.partition(",")
        if isinstance(value, (int, float)) and (metric in METRICS or metric.removesuffix("_stderr") in METRICS):
            got[metric] = round(float(value), 4)
    got["n"] = samples.get("effective", result.get("sample_len"))
    return got
