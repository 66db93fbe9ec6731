"""Zero-shot accuracy through lm-evaluation-harness, driving the in-memory model (optional extra)."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..validate import first_line

logger = logging.getLogger(__name__)


def _harness() -> Any:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ValueError("zero-shot tasks need lm-evaluation-harness: pip install 'pifa[lm-eval]'") from None
    return lm_eval, HFLM, TaskManager


def zero_shot(model: nn.Module, tokenizer: Any, tasks: list[str], batch_size: int = 4, limit: int | None = None,
              include_path: str | None = None) -> dict[str, dict[str, float]]:
    """Metrics per task, e.g. ``{"arc_easy": {"acc": 0.71, "acc_norm": 0.65, ...}}``.

    ``include_path`` adds a folder of local task definitions (YAML); ``limit`` caps the
    documents per task. Unknown task names raise ``ValueError`` before anything runs.
    """
    lm_eval, hflm, task_manager_cls = _harness()
    manager = task_manager_cls(include_path=include_path) if include_path else task_manager_cls()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}")
    device = str(next(model.parameters()).device)
    lm = hflm(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=0,
                                          log_samples=False, bootstrap_iters=0)
    except OSError as exc:  # the task data come from the hub: offline, unreachable, missing (ConnectionError, ...)
        first = first_line(exc)
        raise ValueError(f"lm-eval could not load the data of {', '.join(tasks)} (offline? the task data come "
                         f"from the Hugging Face hub): {first}") from None
    metrics: dict[str, dict[str, float]] = {}
    for task, values in results["results"].items():
        metrics[task] = {k.split(",")[0]: float(v) for k, v in values.items()
                         if isinstance(v, (int, float)) and "stderr" not in k}
    return metrics
