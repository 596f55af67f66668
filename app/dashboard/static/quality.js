// A version's results: tiles for the speedup the serving engine measured and for exact match, the
// held-out answers of base and adapter as a table, and the rest of the quality report as facts.
// Answers are model output and user data: they go into the page as text nodes only (dom.js `h`).

import { facts, h, table } from "./dom.js";

const ENGINES = { serving: "the serving engine", training: "the training loop" };

const percent = (fraction) => `${Math.round(fraction * 100)}%`;
const score = (match) => `${percent(match.accuracy)} (${match.correct}/${match.rows})`;

function tile(id, value, caption) {
  return h("div", { class: "tile", id }, h("div", { class: "big" }, value), h("p", { class: "muted" }, caption));
}

// Turbo types: the engine-measured decode speedup (or why there is none), and how the speculator trained.
function speedupTile(metricsSummary) {
  const speculator = metricsSummary.speculator || {};
  const { measured, phase, estimated_accepted_length: estimate } = speculator;
  if (!measured) return null;
  const trained = phase ? ` Speculator trained ${phase.steps} steps${phase.stop_reason ? ` (${phase.stop_reason})` : ""}.` : "";
  if (measured.error) return tile("speedup-tile", "—", `Speedup not measured: ${measured.error}.${trained}`);
  const estimated = typeof estimate === "number" ? ` (training estimate ${estimate.toFixed(2)})` : "";
  const engine = measured.engine || {};
  const where = engine.dtype && engine.device ? `, ${engine.dtype} on ${engine.device}` : "";
  const how =
    `faster decoding, measured by the serving engine on ${measured.prompts} held-out prompts, greedy, ` +
    `one at a time, up to ${measured.max_new_tokens} tokens each${where}; ${measured.identical_outputs} of ${measured.prompts} outputs identical. ` +
    `${measured.plain_tokens_per_s.toFixed(0)} → ${measured.speculative_tokens_per_s.toFixed(0)} tokens/s, ` +
    `mean accepted length ${measured.mean_accepted_length.toFixed(2)}${estimated}.${trained}`;
  return tile("speedup-tile", `${measured.speedup.toFixed(2)}x`, how);
}

function answeredBy(who) {
  if (!who) return null;
  const setting = [who.dtype, who.device].filter(Boolean).join(" on ");
  return `Answered by ${ENGINES[who.engine] || who.engine}${setting ? ` (${setting})` : ""}.${who.error ? ` ${who.error}` : ""}`;
}

function exactMatchTile(report) {
  const { base, adapter } = report.exact_match || {};
  if (!base && !adapter) return null;
  const ours = adapter ? `adapter (${adapter.correct}/${adapter.rows})` : "no adapter score";
  const against = base ? `vs base ${score(base)}` : "no base-model score";
  const who = answeredBy(report.answered_by);
  return tile("exact-match-tile", adapter ? percent(adapter.accuracy) : "—", `exact match, ${ours} ${against}.${who ? ` ${who}` : ""}`);
}

// The report's `answers`, or (older reports) the base and adapter samples paired row by row.
export function answerRows(report) {
  if (report.answers) return report.answers;
  const { base, adapter } = report.exact_match || {};
  const b = (base && base.samples) || [];
  const a = (adapter && adapter.samples) || [];
  return Array.from({ length: Math.max(a.length, b.length) }, (_, i) => {
    const row = a[i] || b[i];
    return {
      prompt: row.prompt,
      expected: row.reference,
      base: b[i] ? b[i].prediction : null,
      base_correct: b[i] ? b[i].correct : null,
      adapter: a[i] ? a[i].prediction : null,
      adapter_correct: a[i] ? a[i].correct : null,
    };
  });
}

function answerCell(text, correct) {
  if (text === null || text === undefined) return null;
  const mark = correct === null || correct === undefined ? null : h("span", { class: correct ? "right" : "wrong", "data-correct": String(correct) }, correct ? "✓ right" : "✗ wrong");
  const said = text === "" ? h("pre", { class: "answer muted" }, "(empty answer)") : h("pre", { class: "answer" }, text);
  return h("div", {}, mark, said);
}

function answersTable(report) {
  const rows = answerRows(report).map((r) => [
    h("pre", { class: "answer" }, r.prompt),
    h("pre", { class: "answer" }, r.expected),
    answerCell(r.base, r.base_correct),
    answerCell(r.adapter, r.adapter_correct),
  ]);
  if (!rows.length) return null;
  const el = table(["Prompt", "Expected", "Base model", "Adapter"], rows);
  el.id = "answers";
  return el;
}

const pair = (values, digits) =>
  values && values.base !== null && values.base !== undefined && values.adapter !== null && values.adapter !== undefined
    ? `base ${values.base.toFixed(digits)} → adapter ${values.adapter.toFixed(digits)}`
    : null;

// The headline tiles, to lead the version's page; empty while nothing was measured.
export function headline(version) {
  const tiles = [speedupTile(version.metricsSummary), exactMatchTile(version.qualityReport)].filter(Boolean);
  return tiles.length ? h("div", { class: "tiles", id: "headline" }, tiles) : null;
}

// The tasks beyond next-token learning report {before, after} pairs of their own metrics.
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const change = (values, digits) =>
  values && isNumber(values.before) && isNumber(values.after)
    ? `before ${values.before.toFixed(digits)} → after ${values.after.toFixed(digits)}`
    : null;
const TASK_METRICS = [
  ["Accuracy", "accuracy"],
  ["Macro F1", "f1_macro"],
  ["Reward accuracy", "reward_accuracy"],
  ["Reward margin", "reward_margin"],
  ["Mean reward", "reward_mean"],
];

// A classifier's confusion matrix: rows are the true labels, columns the predicted ones.
function confusionTable(report) {
  const matrix = report.confusion_matrix;
  if (!matrix || !Array.isArray(matrix.labels) || !Array.isArray(matrix.matrix)) return null;
  const rows = matrix.labels.map((label, i) => [h("strong", {}, label), ...(matrix.matrix[i] || []).map(String)]);
  const el = table(["true ↓ predicted →", ...matrix.labels], rows);
  el.id = "confusion-matrix";
  return el;
}

export function qualityReport(report) {
  if (!Object.keys(report).length) return [h("p", { class: "muted" }, "none yet")];
  const losses = [
    ["Eval loss", pair(report.eval_loss, 4) || change(report.eval_loss, 4)],
    ["Perplexity", pair(report.perplexity, 2)],
    ...TASK_METRICS.map(([name, key]) => [name, change(report[key], 3)]),
  ].filter(([, value]) => value);
  return [
    report.summary ? h("p", { id: "quality-summary" }, report.summary) : null,
    losses.length ? facts(losses) : null,
    confusionTable(report),
    answersTable(report),
  ];
}
