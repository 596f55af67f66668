// A fine-tuning job while it trains and after: status, step counter, timeline, live loss and
// learning-rate charts fed by the metrics stream, and a cancel button.

import { get, post, streamEvents } from "./api.js";
import { lineChart } from "./charts.js";
import { errorBox, h, statusBadge, when } from "./dom.js";

const FINAL = new Set(["completed", "errored", "canceled", "stopped"]);
const POLL_MS = 1500;

// `onStatus` hears each change of the job's status; `onFinished` is called once if the job ends
// while the panel watches it (not if it had ended already).
export async function jobPanel(uuid, signal, { onStatus, onFinished } = {}) {
  const path = `/v2/finetuning/jobs/${encodeURIComponent(uuid)}`;
  const job = await get(path, { signal });
  const status = h("span", { id: "job-status" });
  const counter = h("span", { id: "step-counter", class: "big" });
  const cancel = h("button", { type: "button", id: "cancel" }, "Cancel job");
  const problems = h("div");
  const timeline = h("ul", { class: "timeline", id: "timeline" });
  const loss = lineChart("loss", { id: "loss-chart" });
  const lr = lineChart("learning rate", { id: "lr-chart" });
  const rows = new Map(); // step → latest frame data (an eval can join a step already sent)

  let shownStatus = job.status;
  function showJob(current) {
    if (current.status !== shownStatus && onStatus) onStatus(current.status);
    shownStatus = current.status;
    status.replaceChildren(statusBadge(current.status));
    counter.textContent = `step ${current.stepsDone} / ${current.totalSteps ?? "?"}`;
    counter.dataset.step = String(current.stepsDone);
    cancel.hidden = FINAL.has(current.status) || current.status === "stopping";
    if (current.error) problems.replaceChildren(errorBox(new Error(current.error)));
  }

  async function refresh() {
    const [current, events] = await Promise.all([get(path, { signal }), get(`${path}/timeline`, { signal })]);
    showJob(current);
    timeline.replaceChildren(...timelineItems(events));
    return current;
  }

  let drawQueued = false;
  function redraw() {
    drawQueued = false;
    const ordered = [...rows.values()].sort((a, b) => a.steps - b.steps);
    const series = (key) => ordered.filter((r) => r[key] !== null && r[key] !== undefined).map((r) => [r.steps, r[key]]);
    loss.update([
      { name: "train", points: series("train_metrics_loss") },
      { name: "eval", points: series("validation_metrics_loss") },
    ]);
    lr.update([{ name: "learning rate", points: series("learning_rate") }]);
  }

  function onFrame(frame) {
    if (frame.data.steps > 0) rows.set(frame.data.steps, frame.data);
    const meta = frame.meta;
    counter.textContent = `step ${meta.steps} / ${meta.total_steps || "?"}`;
    counter.dataset.step = String(meta.steps);
    if (!drawQueued) {
      drawQueued = true;
      requestAnimationFrame(redraw);
    }
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      showJob(await post(`${path}/cancel`, undefined, { signal }));
    } catch (error) {
      problems.replaceChildren(errorBox(error));
    } finally {
      cancel.disabled = false;
    }
  });

  async function follow() {
    // Polling keeps status and timeline current (they change without a metrics row); the stream
    // carries the points, history first.
    const stream = streamEvents(`${path}/metrics/stream`, { signal, onData: onFrame });
    stream.catch((error) => error.name !== "AbortError" && problems.replaceChildren(errorBox(error)));
    let current = job;
    while (!signal.aborted && !FINAL.has(current.status)) {
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      if (signal.aborted) return;
      current = await refresh().catch(() => current);
    }
    await stream.catch(() => null);
    if (signal.aborted) return;
    await refresh().catch(() => null);
    if (onFinished && !FINAL.has(job.status)) onFinished();
  }

  showJob(job);
  await refresh();
  follow();
  return h(
    "div",
    { id: "job", "data-job": uuid },
    h("h2", {}, "Training job"),
    h("p", {}, status, " ", counter, " ", cancel),
    h("p", { class: "muted" }, `job ${uuid}, dataset ${job.datasetName}, attempt ${job.attempt}`),
    problems,
    h("div", { class: "charts" }, loss.el, lr.el),
    h("h3", {}, "Timeline"),
    timeline,
  );
}

// Statuses, restarts and phases (`speculator-phase`) in the order they began, each with what the
// server said about it (a restart's resumed step, a phase's progress).
function timelineItems(events) {
  const ordered = Object.entries(events).sort(([, a], [, b]) => Date.parse(a.startedAt) - Date.parse(b.startedAt));
  return ordered.map(([name, e]) => h("li", { "data-status": name }, `${name.replaceAll("-", " ")}: ${when(e.startedAt)}`, e.detail ? ` — ${e.detail}` : null));
}
