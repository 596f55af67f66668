"""The /ui dashboard in a real browser (Debian's chromium, driven by Playwright) against a live stack.

One control plane, one training worker and one `tiny-random-llama` serving process for the module;
every test signs in through the page as a user would. Screenshots of each page land in
tests/artifacts/dashboard/ (gitignored) for a person to look at after a run.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from worker_fixtures import WorkerStack

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
TINY = "tiny-random-llama"
ROWS = [
    {"prompt": f"Repeat the word number {n}.", "completion": f" number {n} number {n}"} for n in range(16)
]
COMPLETED_STEPS = 4
SPECULATOR_STEPS = 2  # turbo_lora's speculator phase, after the model's steps
ALL_STEPS = COMPLETED_STEPS + SPECULATOR_STEPS
UI_TIMEOUT_MS = 60_000


@dataclass
class Dashboard:
    stack: WorkerStack
    token: str
    api: httpx.Client
    browser: Any  # playwright Browser
    problems: dict[int, list[str]] = field(default_factory=dict)  # per open page

    def open(self, route: str, token: str | None = None) -> Any:
        """A new page, signed in through the form, at `#/route`."""
        page = self.browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(UI_TIMEOUT_MS)
        problems = self.problems.setdefault(id(page), [])

        def console(message: Any) -> None:
            # A refused request is logged by the browser itself; the page shows it, which tests check.
            if message.type == "error" and "Failed to load resource" not in message.text:
                problems.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
        page.goto(f"{self.stack.url}/ui/#/{route}")
        page.fill("#token", token or self.token)
        page.click("#sign-in button[type=submit]")
        return page

    def close(self, page: Any) -> None:
        """Closes the page; fails on any script error or policy violation it logged."""
        problems = self.problems.pop(id(page))
        page.close()
        assert problems == [], problems


def shoot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _upload_dataset(api: httpx.Client, name: str, rows: list[dict[str, str]]) -> dict[str, Any]:
    begun = api.post("/v2/datasets/upload", json={"fileName": f"{name}.jsonl"}).json()
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    httpx.put(begun["presignedUrl"], content=data).raise_for_status()
    api.put(
        "/v2/datasets/upload", json={"name": name, "uploadToken": begun["uploadToken"]}
    ).raise_for_status()
    return _wait_for(
        lambda: api.get(f"/v1/datasets/name/{name}").json(), lambda d: d["status"] != "validating"
    )


def _wait_for(read: Callable[[], Any], done: Callable[[Any], bool], timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while not done(value := read()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting; last seen: {value}")
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def chromium_path() -> Path:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the dashboard tests drive Debian's chromium. "
            "Install it with `apt-get install -y chromium` (.ci/run does this)."
        )
    return CHROMIUM


@pytest.fixture(scope="module")
def dashboard(worker_stack_factory: Callable[..., WorkerStack], chromium_path: Path) -> Iterator[Dashboard]:
    from playwright.sync_api import sync_playwright

    stack = worker_stack_factory("embedded")
    token = stack.mint_token(f"t-{secrets.token_hex(4)}")
    api = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    # The worker (with its validate node: datasets are validated there) and the serving process start
    # side by side.
    stack.new_worker().start()
    api.post("/v2/deployments", json={"name": "tiny", "config": {"baseModel": TINY}}).raise_for_status()
    assert _upload_dataset(api, "numbers", ROWS)["status"] == "connected"
    api.post("/v2/repos", json={"name": "numbers"}).raise_for_status()
    # turbo_lora: its speculator heads make the playground's requests speculate (acceptance rate).
    params = {
        "base_model": TINY,
        "adapter": "turbo_lora",
        "train_steps": COMPLETED_STEPS,
        "speculator_train_steps": SPECULATOR_STEPS,
        "learning_rate": 0.005,
    }
    job = api.post("/v2/finetuning/jobs", json={"params": params, "dataset": "numbers", "repo": "numbers"})
    job.raise_for_status()
    final = _wait_for(
        lambda: api.get(f"/v2/finetuning/jobs/{job.json()['uuid']}").json(),
        lambda j: j["status"] in {"completed", "errored", "canceled"},
    )
    assert final["status"] == "completed", final
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium_path), headless=True, args=CHROMIUM_ARGS
        )
        debian = subprocess.run([chromium_path, "--version"], capture_output=True, text=True, check=True)
        assert browser.version in debian.stdout, "the browser driven must be Debian's chromium"
        yield Dashboard(stack=stack, token=token, api=api, browser=browser)
        browser.close()
    api.close()


def test_a_wrong_token_shows_an_error_and_the_form_again(dashboard: Dashboard) -> None:
    page = dashboard.open("datasets", token="not-a-real-token")
    error = page.wait_for_selector("#sign-in .error")
    assert "refused" in error.inner_text() and "401" in error.inner_text()
    assert page.is_visible("#token") and not page.is_visible("#nav")
    assert page.evaluate("() => sessionStorage.getItem('tuneforge.token')") is None
    shoot(page, "sign-in-wrong-token")
    dashboard.close(page)


def test_the_token_stays_in_session_storage_and_no_cookie_is_set(dashboard: Dashboard) -> None:
    page = dashboard.open("datasets")
    page.wait_for_selector("#datasets")
    shoot(page, "datasets")
    assert page.evaluate("() => sessionStorage.getItem('tuneforge.token')") == dashboard.token
    assert page.context.cookies() == []
    page.click("#sign-out")
    page.wait_for_selector("#sign-in")
    assert page.evaluate("() => sessionStorage.getItem('tuneforge.token')") is None
    dashboard.close(page)


def test_a_dataset_shows_its_rows_first_rows_and_length_histogram(dashboard: Dashboard) -> None:
    page = dashboard.open("datasets")
    page.click("#datasets a:text('numbers')")
    page.wait_for_selector("#length-histogram rect.bar", state="attached")
    facts = page.inner_text("#dataset dl")
    assert "prompt_completion" in facts and str(len(ROWS)) in facts
    assert "Repeat the word number 0." in page.inner_text("#dataset table")
    counts = page.eval_on_selector_all(
        "#length-histogram rect.bar", "bars => bars.map(b => +b.dataset.count)"
    )
    assert sum(counts) == len(ROWS)
    shoot(page, "dataset")
    dashboard.close(page)


def test_an_invalid_dataset_shows_its_validation_error(dashboard: Dashboard) -> None:
    assert _upload_dataset(dashboard.api, "broken", [{"completion": "no prompt"}])["status"] == "errored"
    page = dashboard.open("datasets/broken")
    error = page.wait_for_selector("#validation-error")
    assert "completion" in error.inner_text()
    shoot(page, "dataset-invalid")
    dashboard.close(page)


def test_a_completed_version_draws_its_loss_chart_from_the_jobs_metrics(dashboard: Dashboard) -> None:
    page = dashboard.open("repos")
    page.wait_for_selector("#new-job")
    shoot(page, "repos")
    page.click("#repos a:text('numbers')")
    page.wait_for_selector("#repo [data-status=completed]")
    shoot(page, "repo")
    page.click("#repo a:text('numbers/1')")
    page.wait_for_selector("#job-status [data-status=completed]")
    train_dots = "#loss-chart circle[data-series=train]"
    page.wait_for_function(f"() => document.querySelectorAll('{train_dots}').length === {ALL_STEPS}")
    drawn = page.eval_on_selector_all(train_dots, "dots => dots.map(d => [+d.dataset.x, +d.dataset.y])")
    job_uuid = page.get_attribute("#job", "data-job")
    stored = dashboard.api.get(f"/v2/finetuning/jobs/{job_uuid}/metrics").json()["data"]
    assert drawn == [[m["step"], pytest.approx(m["trainLoss"])] for m in stored]
    assert page.locator("#loss-chart circle[data-series=eval]").count() >= 1  # the final evaluation
    assert page.locator("#lr-chart circle").count() == ALL_STEPS
    assert page.inner_text("#step-counter") == f"step {ALL_STEPS} / {ALL_STEPS}"
    assert "completed" in page.inner_text("#timeline")
    assert "speculator phase" in page.inner_text("#timeline")
    assert page.is_hidden("#cancel")
    assert "exact match" in page.inner_text("#quality-summary")
    # The page leads with the measured speedup and exact match; the answers are a table, not JSON.
    assert page.locator("#headline #speedup-tile .big").inner_text().endswith("x")
    assert "measured by the serving engine" in page.inner_text("#speedup-tile")
    assert "exact match, adapter" in page.inner_text("#exact-match-tile")
    version = dashboard.api.get("/v2/repos/numbers/version/1").json()
    samples = version["qualityReport"]["exact_match"]["adapter"]["samples"]
    expected = page.eval_on_selector_all(
        "#answers tbody tr td:nth-child(2)", "cells => cells.map(c => c.innerText)"
    )
    assert expected == [sample["reference"] for sample in samples]
    assert "exact_match" not in page.inner_text("#version")  # no JSON dump of the report
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "numbers-1.zip"
    shoot(page, "version-completed")
    dashboard.close(page)


HOSTILE = "<img src=x onerror=window.pwned=1>"


def _hostile_version(route: Any) -> None:
    """The real version, its quality report replaced by answers that are markup and a measured speedup."""
    version = route.fetch().json()
    version["qualityReport"] = {
        "exact_match": {
            "base": {"rows": 2, "correct": 0, "accuracy": 0.0, "samples": []},
            "adapter": {"rows": 2, "correct": 1, "accuracy": 0.5, "samples": []},
        },
        "answers": [
            {"prompt": f"Say {HOSTILE}", "expected": "<b>bold</b>", "base": "</td></tr><tr><td>row",
             "adapter": HOSTILE, "base_correct": False, "adapter_correct": True},
            {"prompt": "p2", "expected": "e2", "base": None, "adapter": "", "base_correct": None,
             "adapter_correct": False},
        ],
        "answered_by": {"engine": "serving", "dtype": "float32", "device": "cpu", "rows": 2},
        "summary": f"exact match: {HOSTILE}",
    }  # fmt: skip
    measured = {"prompts": 8, "max_new_tokens": 32, "plain_tokens_per_s": 40.2,
                "speculative_tokens_per_s": 112.0, "speedup": 2.786, "mean_accepted_length": 3.1,
                "acceptance_rate": 0.6, "identical_outputs": 8}  # fmt: skip
    phase = {"steps": 300, "stop_reason": "plateau", "best_step": 250, "history": [[250, 3.1]]}
    version["metricsSummary"]["speculator"] = {"measured": measured, "phase": phase}
    route.fulfill(json=version)


def _timeline_with_a_phase(route: Any) -> None:
    events = route.fetch().json()
    detail = f"speculator step 120 of at most 1000 {HOSTILE}"
    events["speculator-phase"] = {"startedAt": events["completed"]["startedAt"], "detail": detail}
    route.fulfill(json=events)


def test_the_quality_report_is_a_table_of_answers_shown_as_text(dashboard: Dashboard) -> None:
    page = dashboard.open("repos")
    page.wait_for_selector("#new-job")
    page.route("**/v2/repos/numbers/version/1", _hostile_version)
    page.route("**/v2/finetuning/jobs/*/timeline", _timeline_with_a_phase)
    page.evaluate("() => { location.hash = '#/repos/numbers/1'; }")
    page.wait_for_selector("#answers")
    assert page.inner_text("#speedup-tile .big") == "2.79x"
    speedup = page.inner_text("#speedup-tile")
    assert (
        "measured by the serving engine on 8 held-out prompts" in speedup
        and "8 of 8 outputs identical" in speedup
    )
    assert "Speculator trained 300 steps (plateau)" in speedup
    assert page.inner_text("#exact-match-tile .big") == "50%"
    assert "vs base 0% (0/2). Answered by the serving engine (float32 on cpu)" in page.inner_text(
        "#exact-match-tile"
    )
    rows = page.eval_on_selector_all(
        "#answers tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))"
    )
    assert rows == [
        [f"Say {HOSTILE}", "<b>bold</b>", "✗ wrong\n</td></tr><tr><td>row", f"✓ right\n{HOSTILE}"],
        ["p2", "e2", "—", "✗ wrong\n(empty answer)"],  # no base score; an empty answer
    ]
    assert page.locator("#version img, #version b, #timeline img").count() == 0  # text, never markup
    assert page.evaluate("() => window.pwned") is None
    assert HOSTILE in page.inner_text("#quality-summary")
    phase = page.locator("#timeline li[data-status=speculator-phase]").inner_text()
    assert phase.startswith("speculator phase: ") and phase.endswith(
        f"speculator step 120 of at most 1000 {HOSTILE}"
    )
    shoot(page, "version-quality-report")
    dashboard.close(page)


def test_a_job_started_from_the_page_counts_steps_live_and_cancels(dashboard: Dashboard) -> None:
    page = dashboard.open("repos")
    page.wait_for_selector("#new-job")
    page.fill("#job-repo", "live")
    page.select_option("#job-dataset", "numbers")
    page.select_option("#job-base-model", TINY)
    page.select_option("#job-adapter", "turbo_lora")
    page.select_option("#job-parent", "numbers/1")
    page.fill("#job-steps", "5000")
    page.click("#new-job button[type=submit]")
    page.wait_for_url("**/ui/#/repos/live/1")
    assert page.inner_text("#parent-version") == "numbers/1"  # its lineage, linked
    step = "+document.querySelector('#step-counter')?.dataset.step"
    page.wait_for_function(f"() => {step} >= 2", timeout=120_000)
    first = page.evaluate(f"() => {step}")
    page.wait_for_function(f"() => {step} > {first}")  # it moves without reloading the page
    assert page.locator("#loss-chart circle[data-series=train]").count() >= 2
    page.wait_for_selector("#version-status [data-status=training]")  # the version follows its job
    shoot(page, "job-training")

    page.click("#cancel")
    # The version's badge follows the job's; the page is then drawn anew with the ended job.
    page.wait_for_selector("#version-status [data-status=canceled]")
    page.wait_for_selector("#job-status [data-status=canceled]")
    assert page.is_hidden("#cancel")
    assert "canceled" in page.inner_text("#timeline")
    shoot(page, "job-canceled")
    page.click("#parent-version")
    page.wait_for_selector("#version h1:text-is('Adapter numbers/1')")
    dashboard.close(page)


def test_the_playground_streams_the_adapters_answer_beside_the_base_models(dashboard: Dashboard) -> None:
    _wait_for(
        lambda: dashboard.api.get("/v2/deployments/tiny").json()["data"], lambda d: d["status"] == "ready"
    )
    page = dashboard.open("deployments")
    page.wait_for_selector("#deployments [data-status=ready]")
    shoot(page, "deployments")
    page.click("#deployments a:text('tiny')")
    page.wait_for_selector("#deployment-metrics #tokens-per-second")
    page.select_option("#playground-adapter", "numbers/1")
    page.fill("#playground-prompt", "Repeat the word number 3.")
    page.fill("#playground-max-tokens", "12")
    page.click("#playground button[type=submit]")
    for output in ("#out-base", "#out-adapter"):
        page.wait_for_selector(f"{output}[data-done=true]")
        assert page.get_attribute(output, "data-tokens") == "12"
        assert page.inner_text(output) != ""
    assert page.inner_text("#adapter-heading") == "Adapter numbers/1"
    # The serving process's own counters, read through the control plane, move on the page.
    page.wait_for_function("() => +document.querySelector('#generated-tokens')?.textContent >= 24")
    page.wait_for_function(
        "() => document.querySelector('#loaded-adapters')?.textContent.includes('numbers/1')"
    )
    speculative = dashboard.api.get("/v2/deployments/tiny/metrics").json()["speculative"]
    assert speculative["draftTokens"] > 0, "the turbo_lora adapter's heads must have drafted"
    rate = f"{speculative['acceptanceRate'] * 100:.1f} %"
    page.wait_for_selector(f"#acceptance-rate:text-is('{rate}')")
    shoot(page, "deployment-playground")
    dashboard.close(page)
