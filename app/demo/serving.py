"""The demo's last act: serve the adapter it trained and compare base and adapter on held-out prompts."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from tuneforge import (
    AdapterVersion,
    DeploymentClient,
    NotFoundError,
    ServerError,
    Tuneforge,
    TuneforgeError,
)
from tuneforge.rules.datasets import SPLIT_COLUMN, Split

from app.demo.dataset import exact_match

# Every tenant has this deployment without creating it; other base models get one made by the demo.
DEFAULT_DEPLOYMENT = "smollm2-135m"
SERVED_PROMPTS = 3
MAX_ANSWER_TOKENS = 16
SHOWN_ANSWER_CHARS = 40
# The first request starts the serving process; the control plane answers 503 while it loads.
SERVING_START_TIMEOUT_S = 600.0


class ServingDemoError(Exception):
    """Serving the adapter failed; the message says what to look at."""


def deployment_for(client: Tuneforge, base_model: str) -> str:
    """The default deployment when it serves `base_model`, else the demo's own one (made once)."""
    if base_model == DEFAULT_DEPLOYMENT:
        return DEFAULT_DEPLOYMENT
    name = "demo-" + re.sub(r"[^A-Za-z0-9._-]+", "-", base_model)[-50:].strip("-.")
    try:
        client.deployments.get(name)
    except NotFoundError:
        client.deployments.create(name, config={"baseModel": base_model}, wait=False)
    return name


def held_out_rows(dataset_path: Path, count: int = SERVED_PROMPTS) -> list[dict[str, Any]]:
    """The first `count` evaluation rows of the demo dataset: prompts the adapter never trained on."""
    rows = []
    with dataset_path.open() as lines:
        for line in lines:
            row = json.loads(line)
            if row.get(SPLIT_COLUMN) == Split.EVALUATION:
                rows.append(row)
                if len(rows) == count:
                    break
    return rows


def compare(client: Tuneforge, version: AdapterVersion, dataset_path: Path) -> str:
    """Serve `version` and report what the base model and the adapter answer to held-out prompts."""
    name = deployment_for(client, version.base_model or DEFAULT_DEPLOYMENT)
    serving = client.deployments.client(name)
    rows = held_out_rows(dataset_path)
    lines = ["", f"Serving {version.id} through deployment {name!r} at {serving.url}"]
    deadline = time.monotonic() + SERVING_START_TIMEOUT_S
    for row in rows:
        messages = [{"role": "user", "content": str(row["prompt"])}]
        base, tuned = (_answer(serving, messages, adapter, deadline) for adapter in (None, version.id))
        question = str(row["prompt"]).strip().splitlines()
        reference = str(row["completion"])
        lines += [
            f"  {question[1] if len(question) > 1 else question[0]}",
            f"    expected  {reference.strip()!r}",
            f"    base      {_judged(base, reference)}",
            f"    adapter   {_judged(tuned, reference)}",
        ]
    return "\n".join(lines)


def _judged(answer: str, reference: str) -> str:
    """The answer (its start, when long) and whether it is right by the quality report's rule."""
    text = answer.strip()
    shown = text if len(text) <= SHOWN_ANSWER_CHARS else text[:SHOWN_ANSWER_CHARS] + "…"
    return f"{shown!r} ({'right' if exact_match(answer, reference) else 'wrong'})"


def _answer(
    serving: DeploymentClient, messages: list[dict[str, str]], adapter_id: str | None, deadline: float
) -> str:
    """A greedy reply, retried while the serving process is still starting (503) until `deadline`."""
    while True:
        try:
            return serving.chat(messages, adapter_id, max_tokens=MAX_ANSWER_TOKENS, temperature=0)
        except ServerError as exc:
            if exc.status != 503 or time.monotonic() > deadline:
                raise ServingDemoError(f"serving the adapter failed: {exc}") from exc
            time.sleep(1.0)
        except TuneforgeError as exc:
            raise ServingDemoError(f"serving the adapter failed: {exc}") from exc
