// Data side of the Train LoRA node's loss chart: ingests the trainer's progress events,
// keeps every point, and prepares what the canvas draws (decimated lines, axis ranges,
// ticks, status text). Pure ES module without DOM access, so `node --test` can load it.

/** States shown in the status line; "starting" covers the run's first info event. */
export const STATES = ["waiting", "starting", "caching", "training", "checkpoint", "finished", "cancelled", "failed"];
const TERMINAL = new Set(["finished", "cancelled", "failed"]);
const STATUS_KINDS = new Set(["info", "caching", "training", "checkpoint", "finished", "cancelled", "failed"]);
// Reports during training that do not change the run's phase.
const WATCH_KINDS = new Set(["validation", "preview"]);

/** Weight of the past in the fallback EMA; the trainer's default smoothing is the same. */
export const DEFAULT_SMOOTHING = 0.9;

const GIB = 1024 ** 3;

const num = (v) => (typeof v === "number" ? v : v == null || v === "" ? NaN : Number(v));
const finite = (v) => typeof v === "number" && Number.isFinite(v);

/**
 * Debiased exponential moving average (TensorBoard's smoothing, as flux2_train/plot.py):
 * the first output equals the first value; non-finite values pass through unchanged.
 */
export class Smoother {
  constructor(alpha = DEFAULT_SMOOTHING) {
    if (!(alpha >= 0 && alpha < 1)) throw new RangeError(`smoothing must be in [0, 1), got ${alpha}`);
    this.alpha = alpha;
    this.ema = 0;
    this.n = 0;
  }

  add(value) {
    const v = num(value);
    if (!Number.isFinite(v)) return v;
    this.ema = this.ema * this.alpha + (1 - this.alpha) * v;
    this.n += 1;
    return this.ema / (1 - this.alpha ** this.n);
  }
}

/** Whole-list form of Smoother. */
export function smooth(values, alpha = DEFAULT_SMOOTHING) {
  const s = new Smoother(alpha);
  return Array.from(values, (v) => s.add(v));
}

/**
 * One training run as the chart sees it. `version` goes up on every change, so a
 * drawer can cache what it derived (decimated lines, ranges) until the next event.
 */
export class RunState {
  constructor({ smoothing = DEFAULT_SMOOTHING } = {}) {
    this.smoothing = smoothing;
    this.version = 0;
    this.reset();
  }

  reset() {
    this.state = "waiting";
    this.message = "";
    this.steps = []; // step numbers, increasing
    this.loss = []; // raw loss per step (NaN where the server sent none)
    this.smoothed = []; // server's smoothed_loss, else our EMA
    this.step = 0;
    this.total = 0;
    this.caching = { done: 0, total: 0 };
    this.secondsPerStep = NaN;
    this.etaSeconds = NaN;
    this.lr = NaN;
    this.epoch = NaN;
    this.peakMemoryBytes = 0;
    this.memoryTotalBytes = 0;
    this.checkpoints = []; // steps at which a checkpoint was written
    this.validation = { steps: [], losses: [], best: null }; // best: { step, loss }
    this.previews = null; // the latest round: { step, seconds, images: [{ prompt, view, clipScore }] }
    this.run = undefined; // optional run id from the server, to tell runs apart
    this.seq = -Infinity; // optional sequence number from the server, to drop duplicates
    this.smoother = new Smoother(this.smoothing);
    this.version += 1;
  }

  get lastStep() {
    return this.steps.length ? this.steps[this.steps.length - 1] : 0;
  }

  get isTerminal() {
    return TERMINAL.has(this.state);
  }

  /** Apply one progress event; returns true when anything changed. */
  ingest(event) {
    if (!event || typeof event !== "object") return false;
    const kind = event.kind;
    if (kind !== "step" && !STATUS_KINDS.has(kind) && !WATCH_KINDS.has(kind)) return false;
    if (this.#isDuplicate(event)) return false;
    if (this.#startsNewRun(event)) this.reset();
    if (event.run !== undefined) this.run = event.run;
    if (finite(event.seq)) this.seq = event.seq;
    const changed = kind === "step" ? this.#ingestStep(event)
      : WATCH_KINDS.has(kind) ? this.#ingestWatch(event) : this.#ingestStatus(event);
    if (changed) this.version += 1;
    return changed;
  }

  /** Apply events in order; returns true when any changed the state. */
  ingestAll(events) {
    let changed = false;
    for (const e of events ?? []) changed = this.ingest(e) || changed;
    return changed;
  }

  // Seen already: the history route and the websocket overlap after a page reload.
  #isDuplicate(e) {
    if (finite(e.seq) && (e.run === undefined || e.run === this.run) && e.seq <= this.seq) return true;
    return e.kind === "step" && this.steps.length > 0 && num(e.step) === this.lastStep && e.run === this.run;
  }

  #startsNewRun(e) {
    if (e.run !== undefined && this.run !== undefined && e.run !== this.run) return true;
    if (e.kind === "info" || e.kind === "caching") {
      // "info" also reports a resume mid-run (after caching): only a new run when the
      // last one ended or already had steps.
      return this.isTerminal || (e.kind === "info" && this.steps.length > 0);
    }
    // A step that goes backwards belongs to a run whose start we did not see.
    if (e.kind === "step") return this.isTerminal || (this.steps.length > 0 && num(e.step) < this.lastStep);
    return false;
  }

  #ingestStep(e) {
    const step = num(e.step);
    if (!Number.isFinite(step)) return false;
    const loss = num(e.loss);
    const own = this.smoother.add(loss); // kept up to date so a missing smoothed_loss has a fallback
    const server = num(e.smoothed_loss);
    this.steps.push(step);
    this.loss.push(Number.isFinite(loss) ? loss : NaN);
    this.smoothed.push(Number.isFinite(server) ? server : Number.isFinite(own) ? own : NaN);
    this.step = step;
    if (num(e.total) > 0) this.total = num(e.total);
    for (const [key, field] of [["secondsPerStep", "seconds_per_step"], ["etaSeconds", "eta_seconds"],
      ["lr", "lr"], ["epoch", "epoch"]]) {
      const v = num(e[field]);
      if (Number.isFinite(v)) this[key] = v;
    }
    const peak = num(e.peak_memory_bytes);
    if (peak > 0) this.peakMemoryBytes = Math.max(this.peakMemoryBytes, peak);
    const memTotal = num(e.memory_total_bytes);
    if (memTotal > 0) this.memoryTotalBytes = memTotal;
    if (this.state !== "training") {
      this.state = "training";
      this.message = "";
    }
    return true;
  }

  #ingestStatus(e) {
    const kind = e.kind;
    const step = num(e.step);
    const total = num(e.total);
    this.message = typeof e.message === "string" ? e.message : "";
    if (kind === "caching") {
      // Caching counts images, not training steps: kept apart from step/total.
      if (total > 0) this.caching.total = total;
      if (step >= 0) this.caching.done = step;
    } else {
      if (step > 0) this.step = Math.max(this.step, step);
      if (total > 0) this.total = total;
    }
    if (kind === "checkpoint" && step > 0 && !this.checkpoints.includes(step)) this.checkpoints.push(step);
    this.#seedLosses(e.data);
    // Resume info arrives mid-run: keep showing the phase the run is in.
    if (kind === "info") this.state = this.state === "waiting" || this.isTerminal ? "starting" : this.state;
    else this.state = kind;
    if (TERMINAL.has(kind)) this.etaSeconds = NaN;
    return true;
  }

  // The validation loss (a point per evaluation, the best one named) and the latest previews.
  #ingestWatch(e) {
    const step = num(e.step);
    const data = e.data ?? {};
    if (e.kind === "validation") {
      const loss = num(data.validation_loss);
      if (!Number.isFinite(step) || !Number.isFinite(loss)) return false;
      this.#addValidation(step, loss);
      return true;
    }
    const images = Array.isArray(data.images) ? data.images : [];
    this.previews = {
      step,
      seconds: num(data.seconds),
      images: images.map((img) => ({ prompt: img.prompt ?? "", view: img.view ?? null, clipScore: num(img.clip_score) })),
    };
    return true;
  }

  #addValidation(step, loss) {
    const v = this.validation;
    const at = v.steps.indexOf(step);
    if (at >= 0) v.losses[at] = loss;
    else {
      v.steps.push(step);
      v.losses.push(loss);
    }
    const i = v.losses.indexOf(Math.min(...v.losses)); // a replaced point can change the best
    v.best = { step: v.steps[i], loss: v.losses[i] };
  }

  // Optional: an event's data.losses (and data.smoothed_losses) holds the loss of steps
  // 1..n from before a resume, so a resumed run's chart starts at step 1.
  #seedLosses(data) {
    for (const pair of Array.isArray(data?.validation) ? data.validation : []) {
      if (Array.isArray(pair) && finite(pair[0]) && finite(pair[1])) this.#addValidation(pair[0], pair[1]);
    }
    const losses = data?.losses;
    if (!Array.isArray(losses) || losses.length === 0 || this.steps.length > 0) return;
    const given = Array.isArray(data.smoothed_losses) && data.smoothed_losses.length === losses.length
      ? data.smoothed_losses : null;
    losses.forEach((value, i) => {
      const loss = num(value);
      const own = this.smoother.add(loss);
      const server = given ? num(given[i]) : NaN;
      this.steps.push(i + 1);
      this.loss.push(Number.isFinite(loss) ? loss : NaN);
      this.smoothed.push(Number.isFinite(server) ? server : own);
    });
    this.step = Math.max(this.step, losses.length);
  }

  /** What the status line shows, as plain values. */
  summary() {
    return {
      state: this.state,
      message: this.message,
      step: this.step,
      total: this.total,
      caching: { ...this.caching },
      secondsPerStep: this.secondsPerStep,
      etaSeconds: this.etaSeconds,
      lr: this.lr,
      peakMemoryGiB: this.peakMemoryBytes > 0 ? this.peakMemoryBytes / GIB : NaN,
      memoryTotalGiB: this.memoryTotalBytes > 0 ? this.memoryTotalBytes / GIB : NaN,
      points: this.steps.length,
      validation: this.validation.steps.length
        ? { last: this.validation.losses[this.validation.losses.length - 1], best: { ...this.validation.best } } : null,
    };
  }
}

/** Rebuild a run from the history route's `events` (e.g. after a page reload). */
export function fromHistory(events, options) {
  const run = new RunState(options);
  run.ingestAll(Array.isArray(events) ? events : []);
  return run;
}

/**
 * The live events not yet in `history`. Live events buffered while the history request
 * was out can repeat its last events (the server took its snapshot after they were
 * sent); both are slices of one ordered stream, so everything after the buffered copy
 * of the history's last event is new. With no copy, all buffered events are new.
 */
export function eventsAfter(history, live) {
  if (!Array.isArray(live) || live.length === 0) return [];
  const last = Array.isArray(history) && history.length ? eventKey(history[history.length - 1]) : null;
  if (last === null) return live.slice();
  for (let i = live.length - 1; i >= 0; i--) {
    if (eventKey(live[i]) === last) return live.slice(i + 1);
  }
  return live.slice();
}

function eventKey(e) {
  if (!e || typeof e !== "object") return "";
  if (e.run !== undefined || e.seq !== undefined) return `${e.run}|${e.seq}|${e.kind}|${e.step}`;
  return [e.kind, e.step, e.total, e.message ?? "", e.loss ?? ""].join("|");
}

// ------------------------------------------------------------------ formatting

/** Seconds as h:mm:ss ("0:04:05", "27:46:40"); "--:--" when unknown. */
export function formatDuration(seconds) {
  const s = num(seconds);
  if (!Number.isFinite(s) || s < 0) return "--:--";
  const whole = Math.round(s);
  const h = Math.floor(whole / 3600);
  const m = Math.floor((whole % 3600) / 60);
  const sec = whole % 60;
  return `${h}:${String(m).padStart(2, "0")}:${String(sec).padStart(2, "0")}`;
}

/** Bytes as GiB with one decimal, or "" when unknown/zero. */
export function formatGiB(bytes) {
  const b = num(bytes);
  return Number.isFinite(b) && b > 0 ? (b / GIB).toFixed(1) : "";
}

/** Learning rates span 1e-6..1 (Prodigy): exponent form below 0.01. */
export function formatLr(lr) {
  const v = num(lr);
  if (!Number.isFinite(v)) return "";
  if (v === 0) return "0";
  return Math.abs(v) < 0.01 ? v.toExponential(1) : String(Number(v.toPrecision(3)));
}

export function formatSecondsPerStep(s) {
  const v = num(s);
  if (!Number.isFinite(v) || v < 0) return "";
  return v >= 10 ? v.toFixed(1) : v.toFixed(2);
}

const STATE_LABELS = {
  waiting: "Waiting for a run",
  starting: "Starting",
  caching: "Caching",
  training: "Training",
  checkpoint: "Checkpoint",
  finished: "Finished",
  cancelled: "Cancelled",
  failed: "Failed",
};

export function stateLabel(summary) {
  const label = STATE_LABELS[summary.state] ?? summary.state;
  if (summary.state === "caching" && summary.caching.total > 0) {
    return `${label} ${summary.caching.done}/${summary.caching.total}`;
  }
  return label;
}

/**
 * The status text: `head` (state, step/total, ETA), `detail` (s/step, lr, memory) and
 * `message` (the server's words for caching, checkpoints, failures). Empty parts are "".
 */
export function statusLines(summary) {
  const head = [stateLabel(summary)];
  // Before the first step (starting, caching) "step 0/N" says nothing.
  if (summary.total > 0 && summary.step > 0) head.push(`step ${summary.step}/${summary.total}`);
  const live = summary.state === "training" || summary.state === "checkpoint";
  if (live && Number.isFinite(summary.etaSeconds)) head.push(`ETA ${formatDuration(summary.etaSeconds)}`);

  const detail = [];
  const sps = formatSecondsPerStep(summary.secondsPerStep);
  if (sps) detail.push(`${sps} s/step`);
  const lr = formatLr(summary.lr);
  if (lr) detail.push(`lr ${lr}`);
  if (Number.isFinite(summary.peakMemoryGiB)) {
    const total = Number.isFinite(summary.memoryTotalGiB) ? ` / ${summary.memoryTotalGiB.toFixed(1)}` : "";
    detail.push(`peak ${summary.peakMemoryGiB.toFixed(1)}${total} GiB`);
  }
  if (summary.validation) {
    const { last, best } = summary.validation;
    detail.push(`val ${last.toFixed(4)} (best ${best.loss.toFixed(4)} @ ${best.step})`);
  }
  const showMessage = summary.state !== "training" && summary.state !== "waiting";
  return { head: head.join("  ·  "), detail: detail.join("  ·  "), message: showMessage ? summary.message : "" };
}

// ------------------------------------------------------------------ drawing helpers

/**
 * Reduce a line to at most 4 points per pixel bucket (first, min, max, last in x
 * order), which draws the same as the full line at that width and keeps every
 * extreme. `xs` must be increasing. A non-finite y breaks the line: the output has a
 * NaN y there, and the drawer starts a new segment after it. O(n) time, O(buckets) output.
 */
export function decimate(xs, ys, { x0, x1, buckets }) {
  const n = Math.min(xs.length, ys.length);
  const outX = [];
  const outY = [];
  buckets = Math.max(1, Math.floor(buckets));
  if (n <= buckets * 2 || !(x1 > x0)) {
    for (let i = 0; i < n; i++) {
      outX.push(xs[i]);
      outY.push(finite(ys[i]) ? ys[i] : NaN);
    }
    return { xs: outX, ys: outY };
  }
  const scale = buckets / (x1 - x0);
  let bucket = -1;
  let first = -1, last = -1, lo = -1, hi = -1;
  const flush = () => {
    if (first < 0) return;
    // The bucket's points in x order, each index once.
    const picks = [...new Set([first, lo, hi, last])].sort((a, b) => a - b);
    for (const i of picks) {
      outX.push(xs[i]);
      outY.push(ys[i]);
    }
    first = -1;
  };
  for (let i = 0; i < n; i++) {
    const y = ys[i];
    if (!finite(y)) {
      flush();
      if (outY.length && !Number.isNaN(outY[outY.length - 1])) {
        outX.push(xs[i]);
        outY.push(NaN);
      }
      continue;
    }
    const b = Math.min(buckets - 1, Math.max(0, Math.floor((xs[i] - x0) * scale)));
    if (b !== bucket) {
      flush();
      bucket = b;
    }
    if (first < 0) {
      first = last = lo = hi = i;
      continue;
    }
    last = i;
    if (y < ys[lo]) lo = i;
    if (y > ys[hi]) hi = i;
  }
  flush();
  return { xs: outX, ys: outY };
}

/**
 * [min, max] of the finite values, padded by `pad` of the span on each side. A single
 * value or equal values get a span around them; no finite value gives [0, 1].
 */
export function axisRange(values, { pad = 0.05 } = {}) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values ?? []) {
    if (!finite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return padRange(lo, hi, pad);
}

function padRange(lo, hi, pad) {
  if (!(lo <= hi)) return [0, 1];
  if (hi - lo < 1e-12 * Math.max(1, Math.abs(lo))) {
    const half = Math.abs(lo) * 0.05 || 0.5;
    return [lo - half, hi + half];
  }
  const p = (hi - lo) * pad;
  return [lo - p, hi + p];
}

/**
 * y range for the loss chart: the smoothed line in full, the raw loss between its
 * `clip` and 1-`clip` quantiles, so a few spikes do not flatten the curve (they run
 * off the plot's edge instead).
 */
export function lossRange(raw, smoothed, { clip = 0.01, pad = 0.06 } = {}) {
  const finiteRaw = raw.filter(finite).sort((a, b) => a - b);
  let lo = Infinity, hi = -Infinity;
  if (finiteRaw.length) {
    const cut = finiteRaw.length >= 50 ? Math.floor(finiteRaw.length * clip) : 0;
    lo = finiteRaw[cut];
    hi = finiteRaw[finiteRaw.length - 1 - cut];
  }
  for (const v of smoothed) {
    if (!finite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return padRange(lo, hi, pad);
}

/** x range: from the step before the first point to the run's total (or last step). */
export function stepRange(steps, total) {
  const first = steps.length ? steps[0] : 0;
  const last = steps.length ? steps[steps.length - 1] : 0;
  const lo = Math.max(0, first - 1);
  const hi = Math.max(num(total) || 0, last);
  return hi > lo ? [lo, hi] : [lo, lo + 1];
}

/** Round tick values (1, 2, 5 x 10^k) inside [lo, hi]: as many as fit in `count` + 1. */
export function niceTicks(lo, hi, count = 5) {
  if (!finite(lo) || !finite(hi) || !(hi > lo) || count < 1) return [];
  const k = Math.floor(Math.log10((hi - lo) / count));
  const candidates = [k - 1, k, k + 1].flatMap((e) => [1, 2, 5].map((f) => f * 10 ** e));
  const inside = (s) => Math.floor(hi / s + 1e-9) - Math.ceil(lo / s - 1e-9) + 1;
  const step = candidates.find((s) => inside(s) <= count + 1) ?? 10 ** (k + 2);
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const ticks = [];
  for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Number(v.toFixed(decimals)));
  }
  return ticks;
}

/** Ticks for an axis of step numbers: whole steps only, none before there are steps. */
export function stepTicks(lo, hi, count = 5) {
  return niceTicks(lo, hi, count).filter(Number.isInteger);
}

/** Tick label: as many decimals as the tick spacing needs; thousands as "k". */
export function formatTick(v, ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : Math.abs(v) || 1;
  if (Math.abs(v) >= 10000 && step >= 1000) return `${Number((v / 1000).toFixed(1))}k`;
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  return decimals > 5 ? v.toExponential(1) : v.toFixed(decimals);
}
