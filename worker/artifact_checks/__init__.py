"""Owns the checks the worker runs on a published artifact with the serving engine, before storing it:
the quality report as the deployment answers it (served_quality.py) and, for turbo types, the
speculator's measured speedup (speedup.py), both on one engine load (served_engine.py).

Worker glue, not training: the training library never loads the serving engine. No check fails the
job: a check that cannot run records why, and the artifact is stored as training wrote it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from worker.artifact_checks import served_quality, speedup
from worker.artifact_checks.served_engine import ServedArtifact, is_adapter, served
from worker.serving.cpu_kernels import KernelConfig
from worker.training.loop import TrainingResult, write_summary

__all__ = ["add_to_summary"]

log = logging.getLogger(__name__)


def add_to_summary(result: TrainingResult, kernels: KernelConfig = KernelConfig()) -> None:
    """Answer the held-out rows and (turbo types) time the speculator in the serving engine; record them
    as the summary's `quality_report` and `speculator.measured`, in result.summary and in the artifact's
    training_summary.json alike (the version reads both).
    `kernels`: the CPU kernel settings serving runs with (default: on, default cache).
    """
    artifact, summary = result.adapter_dir, result.summary
    if artifact is None:
        return
    speculator = summary.get("speculator")
    prompts = speedup.chosen_prompts(result.held_out_prompts) if speculator is not None else []
    rows = result.held_out_answers if summary.get("quality_report") is not None else []
    if not prompts and not rows:
        return
    report, error = None, None
    try:
        report = _run(result, artifact, prompts, rows, kernels)
    except Exception as exc:  # the engine did not load, or could not answer
        log.exception("checking the artifact in the serving engine failed")
        error = f"{type(exc).__name__}: {exc}"
    if speculator is not None and prompts and "measured" not in speculator:
        speculator["measured"] = {"error": error or "the engine did not run"}
    if rows:
        summary["quality_report"] = (
            report
            if report is not None
            else served_quality.training_report(summary["quality_report"], summary["runtime"], error)
        )
    write_summary(artifact, summary)


def _run(
    result: TrainingResult,
    artifact: Path,
    prompts: list[list[int]],
    rows: served_quality.Rows,
    kernels: KernelConfig,
) -> dict[str, Any] | None:
    """Time the speculator into the summary; return the served quality report (None without rows)."""
    device = str(result.summary["runtime"]["device"])
    max_len = max(
        served_quality.max_len(rows), max((len(p) for p in prompts), default=0) + speedup.MAX_NEW_TOKENS
    )
    as_adapter = is_adapter(artifact)
    with served(
        result.model_dir, artifact if as_adapter else None, max_len=max_len, device=device, kernels=kernels
    ) as engine:
        if prompts:
            result.summary["speculator"]["measured"] = speedup.measure(engine, prompts)
        if not rows:
            return None
        base = served_quality.ask(engine, rows, None)
        if as_adapter:
            return _report(
                result,
                engine,
                rows,
                served_quality.Answers(base, served_quality.ask(engine, rows, engine.artifact_id)),
            )
    # A whole model (full / last_layer) is not an adapter: it is served as a model of its own.
    with served(artifact, None, max_len=max_len, device=device, kernels=kernels) as whole:
        return _report(
            result, whole, rows, served_quality.Answers(base, served_quality.ask(whole, rows, None))
        )


def _report(
    result: TrainingResult,
    served_by: ServedArtifact,
    rows: served_quality.Rows,
    answers: served_quality.Answers,
) -> dict[str, Any]:
    eval_loss = result.summary["quality_report"].get("eval_loss") or {}
    return served_quality.report(served_by, rows, answers, eval_loss)
