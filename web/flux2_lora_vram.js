// vRAM bar on every FLUX.2 LoRA vRAM Estimate node: the estimated peak split into stacked
// parts against the device memory, coloured by the verdict, with the server's advice.
// It asks POST /flux2_lora/estimate whenever the inputs it depends on change (model
// loader, config and dataset widgets, links), so the answer is there before a Run.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { buildEstimateRequest, parseEstimate, barLayout, gib, headline } from "./vram_data.js";
import { themeColors, fitText, wrapText, roundRect, frameThrottle, redrawWidget } from "./flux2_canvas.js";

const NODE_TYPE = "Flux2VramEstimate";
const WIDGET_NAME = "vram_bar";
const DEBOUNCE_MS = 300;
const POLL_MS = 1000; // catches changes that fire no graphChanged (e.g. values set by other extensions)
const MARGIN = 10;
const HEIGHT = 108;

// Hue of each verdict; "unknown" is grey (no saturation).
const HUES = { fits: 140, tight: 38, "fits with offload": 38, "does not fit": 2, unknown: 0 };

const bars = new Set();
let pollTimer = 0;

class VramBar {
  constructor(node) {
    this.node = node;
    this.sentKey = null; // request body of the latest POST
    this.seq = 0; // answers to older requests are dropped
    this.timer = 0;
    this.loading = false;
    this.estimate = null; // parseEstimate() of the latest answer
    this.widget = this.#makeWidget();
    this.requestDraw = frameThrottle(() => redrawWidget(this.node, this.widget));
  }

  #makeWidget() {
    const bar = this;
    return {
      name: WIDGET_NAME,
      type: "flux2_vram_bar",
      value: "",
      serialize: false, // not in the saved workflow
      options: { serialize: false }, // not in the prompt
      computeSize: (width) => [width ?? 0, HEIGHT],
      draw(ctx, node, width, y) {
        bar.draw(ctx, width, y);
      },
    };
  }

  /** Ask again when the request would differ from the last one (debounced). */
  check() {
    if (!this.node.graph) return;
    let key;
    try {
      key = JSON.stringify(buildEstimateRequest(this.node));
    } catch (e) {
      return; // the graph is mid-change (links to removed nodes): the next check sees it settled
    }
    if (key === this.sentKey) return;
    this.sentKey = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.#post(key), DEBOUNCE_MS);
  }

  async #post(body) {
    const seq = ++this.seq;
    this.loading = true;
    this.requestDraw();
    let estimate;
    try {
      const res = await api.fetchApi("/flux2_lora/estimate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body,
      });
      const answer = await res.json().catch(() => null);
      estimate = answer && (res.ok || answer.error) ? parseEstimate(answer)
        : { error: `estimate unavailable (HTTP ${res.status})` };
    } catch (e) {
      estimate = { error: `estimate unavailable: ${e?.message ?? e}` };
    }
    if (seq !== this.seq) return;
    this.loading = false;
    this.estimate = estimate;
    this.answeredKey = body; // the request this estimate answers (tests compare it with the widgets)
    this.requestDraw();
  }

  // ---------------------------------------------------------------- drawing

  draw(ctx, width, y) {
    const c = themeColors();
    const x = MARGIN, w = width - 2 * MARGIN;
    if (w < 60) return;
    ctx.save();
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    const est = this.estimate;
    if (!est || est.error) {
      ctx.font = "11px Arial, sans-serif";
      ctx.fillStyle = est?.error ? c.error : c.muted;
      const text = est?.error ?? (this.loading ? "estimating peak memory…" : "connect model, config and dataset");
      wrapText(ctx, text, w, 4).forEach((line, i) => ctx.fillText(line, x, y + 4 + i * 14));
      ctx.restore();
      return;
    }
    const hue = HUES[est.verdict] ?? 0;
    const sat = est.verdict === "unknown" ? 0 : 65;
    const shade = (i) => `hsl(${hue}, ${sat}%, ${(c.light ? 26 : 30) + i * 15}%)`;

    ctx.font = "bold 12px Arial, sans-serif";
    ctx.fillStyle = est.verdict === "unknown" ? c.text : `hsl(${hue}, ${sat}%, ${c.light ? 30 : 62}%)`;
    ctx.fillText(fitText(ctx, headline(est) + (this.loading ? "  ·  updating…" : ""), w), x, y + 4);

    this.#drawBar(ctx, c, est, shade, x, y + 21, w, 16);
    this.#drawLegend(ctx, c, est, shade, x, y + 43, w);

    ctx.font = "11px Arial, sans-serif";
    ctx.fillStyle = c.muted;
    const advice = est.advice.join("  ·  "); // short phrases from the server: as many as fit
    wrapText(ctx, advice, w, 2).forEach((line, i) => ctx.fillText(line, x, y + 77 + i * 14));
    ctx.restore();
  }

  #drawBar(ctx, c, est, shade, x, y, w, h) {
    const layout = barLayout(est);
    ctx.save();
    roundRect(ctx, x, y, w, h, 3);
    ctx.fillStyle = c.inputBg;
    ctx.fill();
    ctx.clip();
    layout.spans.forEach((s, i) => {
      if (s.width <= 0) return;
      ctx.fillStyle = shade(i);
      ctx.fillRect(x + s.start * w, y, Math.max(1, s.width * w), h);
      // A gap in the track colour between segments, so equal shades stay apart.
      ctx.fillStyle = c.inputBg;
      if (i > 0) ctx.fillRect(x + s.start * w - 0.5, y, 1, h);
    });
    ctx.restore();
    if (layout.mark != null) {
      // Device memory: a mark across the bar, with the capacity under it.
      const mx = Math.round(x + layout.mark * w) + 0.5;
      ctx.strokeStyle = c.fg;
      ctx.lineWidth = 2;
      ctx.beginPath();
      ctx.moveTo(mx, y - 3);
      ctx.lineTo(mx, y + h + 3);
      ctx.stroke();
    }
    ctx.strokeStyle = c.border;
    ctx.lineWidth = 1;
    roundRect(ctx, x + 0.5, y + 0.5, w - 1, h - 1, 3);
    ctx.stroke();
  }

  // Two columns of "■ label 12.3": the parts in bar order.
  #drawLegend(ctx, c, est, shade, x, y, w) {
    ctx.font = "11px Arial, sans-serif";
    const col = w / 2;
    est.segments.forEach((s, i) => {
      const cx = x + (i % 2) * col, cy = y + Math.floor(i / 2) * 15;
      ctx.fillStyle = shade(i);
      ctx.fillRect(cx, cy + 2, 9, 9);
      ctx.fillStyle = c.text;
      ctx.fillText(fitText(ctx, `${s.short} ${gib(s.bytes)} GiB`, col - 16), cx + 13, cy);
    });
  }
}

function checkAll() {
  for (const bar of bars) bar.check();
}

function track(bar) {
  bars.add(bar);
  pollTimer ||= setInterval(checkAll, POLL_MS);
}

function untrack(bar) {
  bars.delete(bar);
  clearTimeout(bar.timer);
  if (!bars.size && pollTimer) {
    clearInterval(pollTimer);
    pollTimer = 0;
  }
}

app.registerExtension({
  name: "comfyui-flux2-lora-trainer.vram-bar",
  setup() {
    // Widget edits, new links and loads all end in a graphChanged from the change tracker.
    api.addEventListener("graphChanged", checkAll);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE_TYPE) return;
    const { onNodeCreated, onAdded, onRemoved, onConnectionsChange } = nodeType.prototype;

    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.flux2VramBar = new VramBar(this);
      this.addCustomWidget(this.flux2VramBar.widget);
      const [w, h] = this.computeSize();
      this.setSize([Math.max(this.size[0], w), Math.max(this.size[1], h)]);
      return r;
    };

    nodeType.prototype.onAdded = function () {
      const r = onAdded?.apply(this, arguments);
      const bar = this.flux2VramBar;
      if (bar) {
        track(bar);
        setTimeout(() => bar.check(), 0); // once the loading graph has its links
      }
      return r;
    };

    nodeType.prototype.onConnectionsChange = function () {
      const r = onConnectionsChange?.apply(this, arguments);
      this.flux2VramBar?.check();
      return r;
    };

    // After a Run the server may know more (a model it loaded since): ask again.
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function () {
      const r = onExecuted?.apply(this, arguments);
      if (this.flux2VramBar) {
        this.flux2VramBar.sentKey = null;
        this.flux2VramBar.check();
      }
      return r;
    };

    nodeType.prototype.onRemoved = function () {
      if (this.flux2VramBar) untrack(this.flux2VramBar);
      return onRemoved?.apply(this, arguments);
    };
  },
});
