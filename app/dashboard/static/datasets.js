// Datasets: the list, and one dataset's validation verdict, columns, first rows and length histogram.

import { get } from "./api.js";
import { histogram } from "./charts.js";
import { errorBox, facts, h, statusBadge, table, when } from "./dom.js";

export async function datasetList(_args, signal) {
  const { data } = await get("/v2/datasets?limit=1000", { signal });
  const rows = data.map((d) => [
    h("a", { href: `#/datasets/${encodeURIComponent(d.uuid)}` }, d.name),
    statusBadge(d.status),
    d.format,
    d.rowCount,
    d.splitCounts ? Object.entries(d.splitCounts).map(([k, v]) => `${k} ${v}`).join(", ") : null,
    when(d.createdAt),
  ]);
  return h(
    "section",
    { id: "datasets" },
    h("h1", {}, "Datasets"),
    data.length ? table(["Name", "Status", "Format", "Rows", "Splits", "Uploaded"], rows) : h("p", { class: "muted" }, "No datasets yet."),
  );
}

export async function datasetPage([ref], signal) {
  const d = await get(`/v2/datasets/${encodeURIComponent(ref)}`, { signal });
  const page = h(
    "section",
    { id: "dataset" },
    h("h1", {}, `Dataset ${d.name}`),
    facts([
      ["Status", statusBadge(d.status)],
      ["File", `${d.fileName} (${d.sizeBytes ?? "?"} bytes)`],
      ["Format", d.format],
      ["Rows", d.rowCount],
      ["Splits", d.splitCounts ? JSON.stringify(d.splitCounts) : null],
      ["Columns", d.columns ? d.columns.join(", ") : null],
      ["Uploaded", when(d.createdAt)],
    ]),
  );
  if (d.lastError) page.append(h("h2", {}, "Validation error"), h("div", { class: "error", id: "validation-error" }, d.lastError));
  if (d.preview && d.preview.length) {
    const columns = Object.keys(d.preview[0]);
    const cell = (value) => (typeof value === "string" ? value : JSON.stringify(value));
    page.append(h("h2", {}, "First rows"), table(columns, d.preview.map((row) => columns.map((c) => cell(row[c])))));
  }
  if (d.status === "connected") page.append(await lengths(d, signal));
  return page;
}

async function lengths(d, signal) {
  try {
    const summary = await get(`/v2/datasets/${encodeURIComponent(d.uuid)}/lengths`, { signal });
    return h(
      "div",
      {},
      h("h2", {}, "Row lengths"),
      histogram("rows per token length", summary.bins, { id: "length-histogram", xName: "tokens" }),
      h("p", { class: "muted" }, `${summary.rows} rows; median ${summary.p50}, p95 ${summary.p95}, max ${summary.max} tokens (${summary.tokenizer})`),
    );
  } catch (error) {
    if (error.name === "AbortError") throw error;
    return errorBox(error);
  }
}
