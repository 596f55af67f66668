// Repos and their adapter versions: lineage, the config a version really trained with, autoconfig
// decisions, measured speedup and quality report (quality.js), download; a form to start a fine-tuning job.

import { download, get, post } from "./api.js";
import { errorBox, facts, h, json, statusBadge, table, when } from "./dom.js";
import { jobPanel } from "./jobs.js";
import { headline, qualityReport } from "./quality.js";

export async function repoList(_args, signal) {
  const { data } = await get("/v2/repos?limit=1000", { signal });
  const rows = data.repos.map((r) => {
    const latest = r.versions.at(-1);
    return [
      h("a", { href: `#/repos/${encodeURIComponent(r.name)}` }, r.name),
      r.description,
      r.versions.length,
      latest ? statusBadge(latest.status) : null,
      when(r.createdAt),
    ];
  });
  return h(
    "section",
    { id: "repos" },
    h("h1", {}, "Repos"),
    rows.length ? table(["Name", "Description", "Versions", "Latest", "Created"], rows) : h("p", { class: "muted" }, "No repos yet."),
    await newJobForm(data.repos, signal),
  );
}

async function newJobForm(repos, signal) {
  const [datasets, models] = await Promise.all([
    get("/v2/datasets?limit=1000", { signal }),
    get("/v2/base-models", { signal }),
  ]);
  const connected = datasets.data.filter((d) => d.status === "connected");
  const select = (id, values) => h("select", { id }, values.map((v) => h("option", { value: v }, v || "— fresh start")));
  const versions = repos.flatMap((r) => r.versions.filter((v) => v.status === "completed").map((v) => `${r.name}/${v.tag}`));
  const fields = {
    dataset: select("job-dataset", connected.map((d) => d.name)),
    repo: h("input", { id: "job-repo", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]*" }),
    base_model: select("job-base-model", models.data.map((m) => m.name)),
    adapter: select("job-adapter", ["lora", "turbo_lora", "turbo"]),
    train_steps: h("input", { id: "job-steps", type: "number", min: 1, value: 100 }),
    learning_rate: h("input", { id: "job-lr", type: "number", step: "any", min: 0, value: 0.0002 }),
    continue_from: select("job-parent", ["", ...versions]),
  };
  const status = h("div");
  const form = h(
    "form",
    { class: "card", id: "new-job" },
    h("h2", {}, "New fine-tuning job"),
    Object.entries(fields).map(([name, input]) => h("label", {}, `${name.replace("_", " ")} `, input)),
    h("button", { type: "submit" }, "Start training"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const repo = fields.repo.value.trim();
    const params = {
      base_model: fields.base_model.value,
      adapter: fields.adapter.value,
      train_steps: Number(fields.train_steps.value),
      learning_rate: Number(fields.learning_rate.value),
    };
    try {
      await post("/v2/repos", { name: repo, existsOk: true });
      const body = { params, dataset: fields.dataset.value, repo };
      if (fields.continue_from.value) body.continueFromVersion = fields.continue_from.value;
      const job = await post("/v2/finetuning/jobs", body);
      location.hash = `#/repos/${encodeURIComponent(job.targetRepoName)}/${job.targetVersionTag}`;
    } catch (error) {
      status.replaceChildren(errorBox(error));
    }
  });
  return form;
}

export async function repoPage([name], signal) {
  const repo = await get(`/v2/repos/${encodeURIComponent(name)}`, { signal });
  const rows = repo.versions.map((v) => [
    h("a", { href: `#/repos/${encodeURIComponent(repo.name)}/${v.tag}` }, `${repo.name}/${v.tag}`),
    statusBadge(v.status),
    v.adapterType,
    v.baseModel,
    v.createdBy,
    when(v.createdAt),
    v.archived ? "archived" : "",
  ]);
  return h(
    "section",
    { id: "repo" },
    h("h1", {}, `Repo ${repo.name}`),
    repo.description ? h("p", {}, repo.description) : null,
    table(["Version", "Status", "Adapter", "Base model", "By", "Created", ""], rows),
  );
}

function parentLink(parent) {
  if (!parent) return "— (fresh start)";
  const [repo, rest] = parent.split("/");
  const tag = rest.split("@")[0];
  return h("a", { href: `#/repos/${encodeURIComponent(repo)}/${tag}`, id: "parent-version" }, parent);
}

export async function versionPage([repo, tag], signal) {
  const versionPath = `/v2/repos/${encodeURIComponent(repo)}/version/${tag}`;
  const v = await get(versionPath, { signal });
  const versionStatus = h("span", { id: "version-status" }, statusBadge(v.status));
  const id = `${v.repo}/${v.tag}`;
  const downloadStatus = h("span");
  const downloadButton = h("button", { type: "button", id: "download" }, "Download adapter (.zip)");
  downloadButton.addEventListener("click", () =>
    download(`/v2/repos/${encodeURIComponent(v.repo)}/version/${v.tag}/download`, `${v.repo}-${v.tag}.zip`).catch((error) =>
      downloadStatus.replaceChildren(errorBox(error)),
    ),
  );
  const page = h(
    "section",
    { id: "version" },
    h("h1", {}, `Adapter ${id}`),
    headline(v),
    facts([
      ["Status", versionStatus],
      ["Adapter type", v.adapterType],
      ["Base model", v.baseModel],
      ["Continued from", parentLink(v.parentVersion)],
      ["Source", v.source],
      ["Created", `${when(v.createdAt)} by ${v.createdBy}`],
      ["Error", v.finetuningJob.error],
    ]),
    v.status === "completed" ? h("p", {}, downloadButton, " ", downloadStatus) : null,
  );
  // The version's status follows its job's; a job that ends while watched changes the version
  // (quality report, download), so the page is drawn anew.
  const onStatus = () =>
    get(versionPath, { signal }).then((now) => versionStatus.replaceChildren(statusBadge(now.status)), () => null);
  const onFinished = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  if (v.finetuningJob.uuid) page.append(await jobPanel(v.finetuningJob.uuid, signal, { onStatus, onFinished }));
  page.append(
    h("h2", {}, "Config used"),
    json(v.config),
    h("h2", {}, "Autoconfig decisions"),
    Object.keys(v.autoconfig).length ? json(v.autoconfig) : h("p", { class: "muted" }, "none recorded"),
    h("h2", {}, "Quality report"),
    ...qualityReport(v.qualityReport),
    h("h2", {}, "Metrics summary"),
    json(v.metricsSummary),
  );
  return page;
}
