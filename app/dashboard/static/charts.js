// SVG charts drawn by the page: a line chart that can be redrawn as points arrive, and a histogram.

import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const W = 420;
const H = 200;
const PAD = { left: 52, right: 10, top: 10, bottom: 26 };
const MAX_MARKERS = 300; // past this many points, only the line is drawn

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

// Enough significant digits that the ends of an axis spanning `span` read differently.
function label(value, span = 0) {
  if (!Number.isFinite(value)) return "";
  const magnitude = Math.abs(value);
  const extra = span > 0 && magnitude > 0 ? Math.max(0, Math.ceil(Math.log10(magnitude / span))) : 0;
  if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(1 + extra);
  return String(+value.toPrecision(Math.min(3 + extra, 12)));
}

function extent(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= Math.abs(lo) * 0.1 || 1;
    hi += Math.abs(hi) * 0.1 || 1;
  }
  return [lo, hi];
}

function axes(svg, [x0, x1], [y0, y1], xName) {
  const bottom = H - PAD.bottom;
  svg.append(
    s("line", { class: "axis", x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: bottom }),
    s("line", { class: "axis", x1: PAD.left, y1: bottom, x2: W - PAD.right, y2: bottom }),
    s("text", { x: PAD.left - 4, y: PAD.top + 8, "text-anchor": "end" }, label(y1, y1 - y0)),
    s("text", { x: PAD.left - 4, y: bottom, "text-anchor": "end" }, label(y0, y1 - y0)),
    s("text", { x: PAD.left, y: H - 8 }, label(x0)),
    s("text", { x: W - PAD.right, y: H - 8, "text-anchor": "end" }, label(x1)),
    s("text", { x: (W + PAD.left) / 2, y: H - 8, "text-anchor": "middle" }, xName),
  );
}

// A chart whose `update(series)` redraws it; series: [{name, points: [[x, y], ...]}].
export function lineChart(title, { id, xName = "step" } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const legend = h("div", { class: "legend" });
  const el = h("figure", { class: "chart", id }, h("h3", {}, title), svg, legend);
  function update(series) {
    svg.replaceChildren();
    legend.replaceChildren();
    const all = series.flatMap((one) => one.points);
    svg.dataset.points = String(all.length);
    if (all.length === 0) {
      svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no points yet"));
      return;
    }
    const xs = extent(all.map((p) => p[0]));
    const ys = extent(all.map((p) => p[1]));
    const px = (x) => PAD.left + ((x - xs[0]) / (xs[1] - xs[0])) * (W - PAD.left - PAD.right);
    const py = (y) => H - PAD.bottom - ((y - ys[0]) / (ys[1] - ys[0])) * (H - PAD.top - PAD.bottom);
    axes(svg, xs, ys, xName);
    series.forEach((one, i) => {
      if (one.points.length === 0) return;
      legend.append(h("span", { class: `key-${i}` }, `● ${one.name} (${label(one.points.at(-1)[1])})`));
      const path = one.points.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(" ");
      svg.append(s("polyline", { class: `series-${i}`, points: path, "data-series": one.name }));
      if (one.points.length > MAX_MARKERS) return;
      for (const [x, y] of one.points) {
        const dot = s("circle", { class: `series-${i} point`, cx: px(x), cy: py(y), r: 2.5 });
        Object.assign(dot.dataset, { series: one.name, x: String(x), y: String(y) });
        svg.append(dot);
      }
    });
  }
  update([]);
  return { el, update };
}

// A histogram of [{start, end, count}] bins.
export function histogram(title, bins, { id, xName } = {}) {
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const el = h("figure", { class: "chart", id }, h("h3", {}, title), svg);
  if (bins.length === 0) return el;
  const top = Math.max(...bins.map((b) => b.count));
  const xs = [bins[0].start, bins.at(-1).end];
  axes(svg, xs, [0, top], xName);
  const width = (W - PAD.left - PAD.right) / bins.length;
  bins.forEach((bin, i) => {
    const height = (bin.count / top) * (H - PAD.top - PAD.bottom);
    const bar = s("rect", { class: "bar", x: PAD.left + i * width + 1, y: H - PAD.bottom - height, width: width - 2, height });
    bar.append(s("title", {}, `${bin.start}–${bin.end - 1}: ${bin.count} rows`));
    Object.assign(bar.dataset, { start: String(bin.start), count: String(bin.count) });
    svg.append(bar);
  });
  return el;
}
