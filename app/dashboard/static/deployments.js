// Deployments: status, live serving numbers (tokens/s, Turbo acceptance rate, loaded adapters), and
// a playground that streams an adapter's answer beside the base model's.

import { get, session, streamEvents } from "./api.js";
import { errorBox, facts, h, json, statusBadge, table, when } from "./dom.js";

const METRICS_POLL_MS = 2000;

export async function deploymentList(_args, signal) {
  const { data } = await get("/v2/deployments", { signal });
  const rows = data.map((d) => [
    h("a", { href: `#/deployments/${encodeURIComponent(d.name)}` }, d.name),
    statusBadge(d.status),
    d.model.name,
    d.type,
    when(d.createdAt),
  ]);
  return h("section", { id: "deployments" }, h("h1", {}, "Deployments"), table(["Name", "Status", "Base model", "Type", "Created"], rows));
}

function number(value, digits = 1) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

function metricsFacts(m) {
  const rate = m.speculative && m.speculative.acceptanceRate !== null ? `${(m.speculative.acceptanceRate * 100).toFixed(1)} %` : "— (no drafts verified)";
  return facts([
    ["Serving status", statusBadge(m.status)],
    ["Tokens / s (last 10 s)", h("span", { id: "tokens-per-second" }, number(m.tokensPerSecond))],
    ["Generated tokens", h("span", { id: "generated-tokens" }, number(m.generatedTokens, 0))],
    ["Requests finished", number(m.requests, 0)],
    ["Running / waiting", `${number(m.runningSequences, 0)} / ${number(m.waitingSequences, 0)}`],
    ["Turbo acceptance rate", h("span", { id: "acceptance-rate" }, rate)],
    ["Your loaded adapters", h("span", { id: "loaded-adapters" }, m.loadedAdapters.length ? m.loadedAdapters.join(", ") : "none")],
  ]);
}

export async function deploymentPage([name], signal) {
  const encoded = encodeURIComponent(name);
  const [{ data: d }, repos] = await Promise.all([
    get(`/v2/deployments/${encoded}`, { signal }),
    get("/v2/repos?limit=1000", { signal }),
  ]);
  const live = h("div", { id: "deployment-metrics" });
  async function poll() {
    while (!signal.aborted) {
      try {
        live.replaceChildren(metricsFacts(await get(`/v2/deployments/${encoded}/metrics`, { signal })));
      } catch (error) {
        if (error.name === "AbortError") return;
        live.replaceChildren(errorBox(error));
      }
      await new Promise((resolve) => setTimeout(resolve, METRICS_POLL_MS));
    }
  }
  poll();
  const adapters = repos.data.repos.flatMap((r) =>
    r.versions.filter((v) => v.status === "completed" && !v.archived && v.baseModel === d.model.name).map((v) => `${r.name}/${v.tag}`),
  );
  return h(
    "section",
    { id: "deployment" },
    h("h1", {}, `Deployment ${d.name}`),
    facts([
      ["Status", statusBadge(d.status)],
      ["Base model", d.model.name],
      ["Max input length", d.model.maxInputLength],
      ["Replicas", d.currentReplicas],
      ["Description", d.description],
    ]),
    h("h2", {}, "Serving"),
    live,
    h("h2", {}, "Config"),
    json(d.config),
    playground(d.name, adapters, signal),
  );
}

function playground(name, adapters, signal) {
  const tenant = encodeURIComponent(session.user.tenant.name);
  const url = `/${tenant}/deployments/v2/llms/${encodeURIComponent(name)}/generate_stream`;
  const adapter = h("select", { id: "playground-adapter" }, adapters.map((a) => h("option", { value: a }, a)));
  const prompt = h("textarea", { id: "playground-prompt", rows: 3, required: true }, "");
  const maxTokens = h("input", { id: "playground-max-tokens", type: "number", min: 1, max: 2048, value: 32 });
  const outputs = { base: h("pre", { id: "out-base" }), adapter: h("pre", { id: "out-adapter" }) };
  const problems = h("div");
  const button = h("button", { type: "submit" }, "Generate");

  async function run(target, adapterId) {
    target.textContent = "";
    target.dataset.tokens = "0";
    target.dataset.done = "false";
    const parameters = { max_new_tokens: Number(maxTokens.value) };
    if (adapterId) parameters.adapter_id = adapterId;
    await streamEvents(url, {
      method: "POST",
      body: { inputs: prompt.value, parameters },
      signal,
      onData: (event) => {
        if (event.error) throw new Error(event.error);
        target.append(event.token.text);
        target.dataset.tokens = String(Number(target.dataset.tokens) + 1);
      },
    });
    target.dataset.done = "true";
  }

  const form = h(
    "form",
    { class: "card", id: "playground" },
    h("h2", {}, "Playground"),
    adapters.length ? h("label", {}, "Adapter ", adapter) : h("p", { class: "muted" }, "No completed adapter of this base model yet."),
    h("label", {}, "Prompt ", prompt),
    h("label", {}, "Max new tokens ", maxTokens),
    button,
    problems,
    h(
      "div",
      { class: "side-by-side" },
      h("div", {}, h("h3", {}, "Base model"), outputs.base),
      h("div", {}, h("h3", {}, h("span", { id: "adapter-heading" }, "Adapter")), outputs.adapter),
    ),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    problems.replaceChildren();
    button.disabled = true;
    const chosen = adapters.length ? adapter.value : null;
    document.getElementById("adapter-heading").textContent = chosen ? `Adapter ${chosen}` : "Adapter (none chosen)";
    const runs = [run(outputs.base, null), chosen ? run(outputs.adapter, chosen) : Promise.resolve()];
    for (const result of await Promise.allSettled(runs)) {
      if (result.status === "rejected" && result.reason.name !== "AbortError") problems.append(errorBox(result.reason));
    }
    button.disabled = false;
  });
  return form;
}
