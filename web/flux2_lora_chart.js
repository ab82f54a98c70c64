// Live loss chart on every FLUX.2 Train LoRA node: raw loss (thin) and smoothed loss
// (bold) with axes, the validation loss (dots, the best one ringed), a status line (state,
// step/total, s/step, ETA, lr, peak memory, validation) and a strip of the latest previews.
// Fed by the trainer's `flux2_lora.progress` websocket events; after a page reload it
// rebuilds from GET /flux2_lora/history/<execution id>?workflow=<workflow id>.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  RunState, fromHistory, eventsAfter, decimate, lossRange, stepRange, niceTicks, stepTicks, formatTick, statusLines,
} from "./chart_data.js";
import { themeColors, fitText, frameThrottle, redrawWidget } from "./flux2_canvas.js";

const NODE_TYPE = "Flux2TrainLora";
const EVENT = "flux2_lora.progress";
const WIDGET_NAME = "loss_chart";
const MIN_HEIGHT = 190; // status lines + a plot that still shows a trend
const MIN_WIDTH = 200; // with litegraph's widget padding, the 320-wide layouts keep their width
const MARGIN = 10; // litegraph's widget margin, so the chart lines up with the widgets above
const LINE = 15;
const STRIP = 92; // the preview strip under the plot: caption + thumbnails

/** Charts of the nodes in the open graph, for routing websocket events to them. */
const charts = new Set();

class LossChart {
  constructor(node) {
    this.node = node;
    this.run = new RunState();
    this.historyFor = null; // execution id whose history was asked for
    this.historyKey = null; // workflow and execution ids of that request
    this.request = 0; // only the latest history request's answer is used
    this.loading = false;
    this.buffer = []; // live events that arrive while the history request is out
    this.cache = null;
    this.images = new Map(); // preview URL -> Image, loaded once
    this.widget = this.#makeWidget();
    this.requestDraw = frameThrottle(() => redrawWidget(this.node, this.widget));
  }

  #makeWidget() {
    const chart = this;
    return {
      name: WIDGET_NAME,
      type: "flux2_loss_chart",
      value: "",
      // Display only: `serialize` keeps it out of widgets_values (the saved workflow),
      // `options.serialize` out of the prompt that Run sends.
      serialize: false,
      options: { serialize: false },
      // Layout-sized (not computeSize) so the plot takes whatever height the node is given.
      computeLayoutSize: () => ({ minHeight: MIN_HEIGHT + (chart.hasPreviews ? STRIP : 0), minWidth: MIN_WIDTH }),
      draw(ctx, node, width, y, H) {
        const height = Math.max(this.computedHeight ?? 0, H ?? 0, MIN_HEIGHT);
        chart.draw(ctx, width, y, height);
      },
    };
  }

  /** Whether a websocket event is of this node's run: the node its execution id names, in this workflow. */
  shows(event) {
    const root = rootOf(this.node);
    if (!root || (event.workflow && root.id && event.workflow !== root.id)) return false;
    return nodeAtExecutionId(root, event.node) === this.node;
  }

  onEvent(event) {
    if (this.loading) this.buffer.push(event);
    else if (this.run.ingest(event)) this.#changed();
  }

  get hasPreviews() {
    return Boolean(this.run.previews?.images.length);
  }

  #changed() {
    if (this.hasPreviews && this.node.size[1] < this.node.computeSize()[1]) {
      this.node.setSize([this.node.size[0], this.node.computeSize()[1]]); // room for the strip
    }
    this.requestDraw();
  }

  /** The preview's image, fetched from ComfyUI's /view of the output folder. */
  image(view) {
    if (!view?.filename) return null;
    const query = new URLSearchParams({ filename: view.filename, subfolder: view.subfolder ?? "", type: view.type ?? "output" });
    const url = api.apiURL(`/view?${query}`);
    let img = this.images.get(url);
    if (!img) {
      img = new Image();
      img.onload = () => this.requestDraw();
      img.src = url;
      this.images.set(url, img);
    }
    return img;
  }

  /** Rebuild from the server's record of the node's latest run in this workflow; `force` asks again. */
  async loadHistory(force = false) {
    const root = rootOf(this.node);
    if (!root || this.node.id == null || this.node.id === -1) return;
    const ids = executionIds(this.node, root);
    const workflow = root.id ? String(root.id) : "";
    const key = `${workflow}/${ids.join(",")}`;
    if (!force && this.historyKey === key) return;
    this.historyKey = key;
    this.historyFor = ids[0] ?? null;
    const request = ++this.request;
    this.loading = true;
    this.buffer = [];
    let history = null;
    try {
      // A subgraph placed twice runs its node under two ids: the first with a run answers.
      for (const id of ids) {
        const query = workflow ? `?workflow=${encodeURIComponent(workflow)}` : "";
        const res = await api.fetchApi(`/flux2_lora/history/${encodeURIComponent(id)}${query}`);
        const events = res.ok ? (await res.json())?.events : null;
        if (!Array.isArray(events)) continue;
        history = events;
        this.historyFor = id;
        if (events.length) break;
      }
    } catch {
      // Server unreachable or an older pack without the route: keep the live events.
    }
    if (request !== this.request) return; // a newer request (reconnect, new id) answers instead
    this.loading = false;
    if (Array.isArray(history)) {
      this.run = fromHistory(history);
      this.run.ingestAll(eventsAfter(history, this.buffer));
    } else {
      this.run.ingestAll(this.buffer);
    }
    this.buffer = [];
    this.cache = null;
    this.#changed();
  }

  // ---------------------------------------------------------------- drawing

  draw(ctx, width, y, height) {
    const c = themeColors();
    const x0 = MARGIN, w = width - 2 * MARGIN;
    if (w < 40) return;
    ctx.save();
    const lines = statusLines(this.run.summary());
    let ty = y + 4;
    ctx.textBaseline = "top";
    ctx.textAlign = "left";
    ctx.font = "bold 12px Arial, sans-serif";
    ctx.fillStyle = this.#stateColor(c);
    ctx.fillText(fitText(ctx, lines.head, w), x0, ty);
    ty += LINE;
    ctx.font = "11px Arial, sans-serif";
    ctx.fillStyle = c.muted;
    if (lines.detail) {
      ctx.fillText(fitText(ctx, lines.detail, w), x0, ty);
      ty += LINE;
    }
    if (lines.message) {
      ctx.fillStyle = this.run.state === "failed" ? c.error : c.muted;
      ctx.fillText(fitText(ctx, lines.message, w), x0, ty);
      ty += LINE;
    }
    const strip = this.hasPreviews ? STRIP : 0;
    this.#drawPlot(ctx, c, x0, ty + 2, w, y + height - 4 - strip - (ty + 2));
    if (strip) this.#drawPreviews(ctx, c, x0, y + height - strip, w, strip);
    ctx.restore();
  }

  // The latest previews side by side, each as large as the strip allows, with their step.
  #drawPreviews(ctx, c, x, y, w, h) {
    const { step, seconds, images } = this.run.previews;
    ctx.font = "10px Arial, sans-serif";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillStyle = c.muted;
    const cost = Number.isFinite(seconds) ? ` · ${seconds.toFixed(1)} s` : "";
    ctx.fillText(fitText(ctx, `previews at step ${step}${cost}`, w), x, y + 4);
    const gap = 4, top = y + 18, side = Math.min(h - 22, (w - gap * (images.length - 1)) / images.length);
    this.previewRects = [];
    images.forEach((entry, i) => {
      const px = x + i * (side + gap);
      const img = this.image(entry.view);
      if (img?.complete && img.naturalWidth > 0) ctx.drawImage(img, px, top, side, side);
      else {
        ctx.fillStyle = c.inputBg;
        ctx.fillRect(px, top, side, side);
      }
      ctx.strokeStyle = c.border;
      ctx.lineWidth = 1;
      ctx.strokeRect(px + 0.5, top + 0.5, side - 1, side - 1);
      this.previewRects.push({ x: px, y: top, w: side, h: side, prompt: entry.prompt });
    });
  }

  #stateColor(c) {
    const state = this.run.state;
    if (state === "failed") return c.error;
    if (state === "finished") return c.light ? "#1b7f3b" : "#5fd38a";
    if (state === "cancelled") return c.light ? "#9a6400" : "#f0b44c";
    return c.text;
  }

  #drawPlot(ctx, c, x, y, w, h) {
    this.plotRect = { x, y, w, h }; // in node coordinates: where the plot is drawn
    if (h < 40) return;
    const run = this.run;
    ctx.font = "10px Arial, sans-serif";
    const xLabelH = 14;
    const view = this.#view(ctx, w, h - xLabelH);
    const labels = view.yTicks.map((t) => ctx.measureText(formatTick(t, view.yTicks)).width);
    const gutter = labels.length ? Math.ceil(Math.max(...labels)) + 6 : 0;
    const px = x + gutter, pw = w - gutter, py = y, ph = h - xLabelH;

    ctx.fillStyle = c.inputBg;
    ctx.fillRect(px, py, pw, ph);
    const toX = (v) => px + ((v - view.xr[0]) / (view.xr[1] - view.xr[0])) * pw;
    const toY = (v) => py + ph - ((v - view.yr[0]) / (view.yr[1] - view.yr[0])) * ph;

    this.#drawGrid(ctx, c, view, { px, py, pw, ph, toX, toY });
    if (!run.steps.length) {
      ctx.fillStyle = c.muted;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      const hint = run.state === "caching" ? "caching images…" : "the loss curve appears here during training";
      ctx.fillText(fitText(ctx, hint, pw - 8), px + pw / 2, py + ph / 2);
    } else {
      ctx.save();
      ctx.beginPath();
      ctx.rect(px, py, pw, ph);
      ctx.clip(); // spikes beyond the robust y range run off the edge
      strokeSeries(ctx, view.raw, toX, toY, c.accentSoft, 1);
      strokeSeries(ctx, view.smooth, toX, toY, c.accent, 2.25);
      this.#drawValidation(ctx, c, toX, toY);
      ctx.restore();
      this.#drawCheckpoints(ctx, c, { px, py, pw, ph, toX });
      this.#drawLegend(ctx, c, px + pw - 4, py + 3);
    }
    ctx.strokeStyle = c.border;
    ctx.lineWidth = 1;
    ctx.strokeRect(px + 0.5, py + 0.5, pw - 1, ph - 1);
  }

  // Decimated lines, ranges and ticks: recomputed only when the data or the width change.
  #view(ctx, pw, ph) {
    const run = this.run;
    const scale = Math.max(1, Math.abs(ctx.getTransform?.().a ?? 1)); // zoom x device pixels
    const buckets = Math.min(4096, Math.ceil(pw * scale));
    const key = `${run.version}|${buckets}|${Math.round(ph)}`;
    if (this.cache?.key === key && this.cache.run === run) return this.cache;
    const xr = stepRange(run.steps, run.total);
    const yr = lossRange(run.loss, run.smoothed.concat(run.validation.losses));
    const opts = { x0: xr[0], x1: xr[1], buckets };
    this.cache = {
      key, run, xr, yr,
      raw: decimate(run.steps, run.loss, opts),
      smooth: decimate(run.steps, run.smoothed, opts),
      xTicks: run.steps.length || run.total ? stepTicks(xr[0], xr[1], Math.max(2, Math.floor(pw / 70))) : [],
      yTicks: run.steps.length ? niceTicks(yr[0], yr[1], Math.max(2, Math.floor(ph / 30))) : [],
    };
    return this.cache;
  }

  #drawGrid(ctx, c, view, { px, py, pw, ph, toX, toY }) {
    ctx.lineWidth = 1;
    ctx.strokeStyle = c.border;
    ctx.fillStyle = c.muted;
    ctx.globalAlpha = 0.9;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of view.yTicks) {
      const ty = Math.round(toY(t)) + 0.5;
      if (ty < py - 1 || ty > py + ph + 1) continue; // a tick on the frame's edge still counts
      ctx.fillText(formatTick(t, view.yTicks), px - 4, ty);
      gridLine(ctx, px, ty, px + pw, ty);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of view.xTicks) {
      const tx = Math.round(toX(t)) + 0.5;
      if (tx < px - 1 || tx > px + pw + 1) continue;
      const label = formatTick(t, view.xTicks);
      const half = ctx.measureText(label).width / 2;
      ctx.fillText(label, Math.min(Math.max(tx, px + half), px + pw - half), py + ph + 3);
      gridLine(ctx, tx, py, tx, py + ph);
    }
    ctx.globalAlpha = 1;
  }

  // Validation loss: dots joined by a thin line; the best one ringed.
  #drawValidation(ctx, c, toX, toY) {
    const { steps, losses, best } = this.run.validation;
    if (!steps.length) return;
    ctx.strokeStyle = c.validation;
    ctx.fillStyle = c.validation;
    ctx.lineWidth = 1;
    ctx.beginPath();
    steps.forEach((s, i) => (i ? ctx.lineTo(toX(s), toY(losses[i])) : ctx.moveTo(toX(s), toY(losses[i]))));
    ctx.stroke();
    steps.forEach((s, i) => dot(ctx, toX(s), toY(losses[i]), 1.8));
    if (best) {
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.arc(toX(best.step), toY(best.loss), 5.5, 0, Math.PI * 2);
      ctx.stroke();
    }
  }

  // Checkpoints: small triangles on the bottom edge, over the lines.
  #drawCheckpoints(ctx, c, { px, py, pw, ph, toX }) {
    const marks = this.run.checkpoints;
    if (marks.length > pw / 8) return; // frequent checkpoints would only draw a dotted line
    ctx.fillStyle = c.text;
    for (const s of marks) {
      const tx = toX(s);
      if (tx < px - 1 || tx > px + pw + 1) continue;
      ctx.beginPath();
      ctx.moveTo(tx, py + ph - 6);
      ctx.lineTo(tx - 3.5, py + ph);
      ctx.lineTo(tx + 3.5, py + ph);
      ctx.closePath();
      ctx.fill();
    }
  }

  #drawLegend(ctx, c, right, top) {
    ctx.font = "10px Arial, sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    const items = [["smoothed", c.accent, 2.25], ["loss", c.accentSoft, 1.5]];
    if (this.run.validation.steps.length) items.unshift(["validation", c.validation, 1.5]);
    let x = right;
    for (const [label, color, width] of items) {
      ctx.fillStyle = c.muted;
      ctx.fillText(label, x, top);
      x -= ctx.measureText(label).width + 4;
      ctx.strokeStyle = color;
      ctx.lineWidth = width;
      ctx.beginPath();
      ctx.moveTo(x - 12, top + 6);
      ctx.lineTo(x, top + 6);
      ctx.stroke();
      x -= 22;
    }
  }
}

function gridLine(ctx, x1, y1, x2, y2) {
  ctx.save();
  ctx.globalAlpha = 0.25;
  ctx.beginPath();
  ctx.moveTo(x1, y1);
  ctx.lineTo(x2, y2);
  ctx.stroke();
  ctx.restore();
}

/** A polyline that breaks at NaN y; a lone point becomes a dot. */
function strokeSeries(ctx, { xs, ys }, toX, toY, color, width) {
  ctx.strokeStyle = color;
  ctx.fillStyle = color;
  ctx.lineWidth = width;
  ctx.lineJoin = "round";
  ctx.beginPath();
  let run = 0;
  for (let i = 0; i < xs.length; i++) {
    if (Number.isNaN(ys[i])) {
      if (run === 1) dot(ctx, toX(xs[i - 1]), toY(ys[i - 1]), width);
      run = 0;
      continue;
    }
    const x = toX(xs[i]), y = toY(ys[i]);
    if (run === 0) ctx.moveTo(x, y);
    else ctx.lineTo(x, y);
    run += 1;
  }
  ctx.stroke();
  if (run === 1) dot(ctx, toX(xs[xs.length - 1]), toY(ys[ys.length - 1]), width);
}

function dot(ctx, x, y, width) {
  ctx.save();
  ctx.beginPath();
  ctx.arc(x, y, Math.max(2, width * 1.2), 0, Math.PI * 2);
  ctx.fill();
  ctx.restore();
}

// ------------------------------------------------------------------ execution ids
// ComfyUI runs a node inside a subgraph under the path to it: `12:6` is node 6 of the subgraph
// that node 12 of the root graph places. A subgraph placed twice runs its nodes under two ids.

function rootOf(node) {
  return node.graph?.rootGraph ?? node.graph ?? null;
}

/** The node an execution id names, walked to from the root graph. */
function nodeAtExecutionId(root, executionId) {
  let graph = root, node = null;
  for (const part of String(executionId).split(":")) {
    if (!graph) return null;
    node = graph.getNodeById(part) ?? graph.getNodeById(Number(part));
    graph = node?.subgraph ?? null;
  }
  return node;
}

/** The node's execution ids: its id in the root graph, else one per placement of its subgraph. */
function executionIds(node, root) {
  if (node.graph === root) return [String(node.id)];
  const ids = [];
  const walk = (graph, prefix, depth) => {
    if (depth > 32) return; // nesting that deep is a cycle, not a workflow
    for (const placed of graph.nodes ?? []) {
      if (!placed.subgraph) continue;
      const path = `${prefix}${placed.id}:`;
      if (placed.subgraph === node.graph) ids.push(`${path}${node.id}`);
      else walk(placed.subgraph, path, depth + 1);
    }
  };
  walk(root, "", 0);
  return ids;
}

// ------------------------------------------------------------------ registration

function onProgress(e) {
  const event = e.detail;
  if (!event || event.node == null) return;
  for (const chart of charts) if (chart.shows(event)) chart.onEvent(event);
}

app.registerExtension({
  name: "comfyui-flux2-lora-trainer.loss-chart",
  setup() {
    api.addEventListener(EVENT, onProgress);
    // Events sent while the socket was down are lost: take the server's record again.
    api.addEventListener("reconnected", () => {
      for (const chart of charts) chart.loadHistory(true);
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const { onNodeCreated, onAdded, onRemoved } = nodeType.prototype;

    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.flux2LossChart = new LossChart(this);
      this.addCustomWidget(this.flux2LossChart.widget);
      const [w, h] = this.computeSize();
      this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      return r;
    };

    // The node has its id from here on (a loaded workflow's id, or a new one).
    nodeType.prototype.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      const chart = this.flux2LossChart;
      if (chart) {
        charts.add(chart);
        // After the current graph load finishes, so node ids and the socket are settled.
        setTimeout(() => chart.loadHistory(), 0);
      }
      return r;
    };

    nodeType.prototype.onRemoved = function () {
      if (this.flux2LossChart) charts.delete(this.flux2LossChart);
      return onRemoved?.apply(this, arguments);
    };
  },
});
