// Unit tests of web/chart_data.js (the loss chart's data side): node --test tests/web/
import { test, describe } from "node:test";
import assert from "node:assert/strict";

import {
  RunState, Smoother, smooth, fromHistory, eventsAfter, decimate, axisRange, lossRange, stepRange, niceTicks, stepTicks, formatTick,
  formatDuration, formatGiB, formatLr, statusLines, stateLabel,
} from "../../web/chart_data.js";

const GIB = 1024 ** 3;

function stepEvent(step, loss, extra = {}) {
  return {
    node: "7", kind: "step", step, total: 100, loss, smoothed_loss: loss, lr: 1e-4, seconds_per_step: 1.5,
    eta_seconds: (100 - step) * 1.5, peak_memory_bytes: 20 * GIB, memory_total_bytes: 80 * GIB, epoch: 0, ...extra,
  };
}

const status = (kind, message = "", step = 0, total = 0, data = {}) => ({ node: "7", kind, message, step, total, data });

/** A whole run as the trainer emits it: info, caching, training, steps, checkpoints, end. */
function runEvents({ steps = 10, end = "finished", saveEvery = 5 } = {}) {
  const events = [status("info", "bf16 weights", 0, steps), status("caching", "caching 3 images", 0, 3)];
  for (let i = 1; i <= 3; i++) events.push(status("caching", `cached img${i}.png`, i, 3));
  events.push(status("training", "training 96 LoRA tensors", 0, steps));
  for (let s = 1; s <= steps; s++) {
    events.push(stepEvent(s, 0.5 + 0.1 * Math.sin(s), { total: steps }));
    if (s % saveEvery === 0) events.push(status("checkpoint", `checkpoint at step ${s}`, s, steps, { path: "x" }));
  }
  if (end === "finished") events.push(status("finished", "LoRA written to out.safetensors", steps, steps));
  if (end === "cancelled") events.push(status("cancelled", "stopped at step 10", steps, steps));
  if (end === "failed") events.push(status("failed", "CUDA out of memory", 0, steps));
  return events;
}

describe("smoothing", () => {
  test("debiased EMA: first value unchanged, then pulled towards the past", () => {
    const s = new Smoother(0.9);
    assert.equal(s.add(1), 1);
    const second = s.add(0);
    // ema = 0.9*0.1 + 0 = 0.09 after two; debias 1 - 0.81 = 0.19
    assert.ok(Math.abs(second - 0.09 / 0.19) < 1e-12);
  });

  test("non-finite values pass through and do not disturb the average", () => {
    assert.deepEqual(smooth([2, NaN, 2], 0.5).map((v) => (Number.isNaN(v) ? "nan" : v)), [2, "nan", 2]);
    assert.deepEqual(smooth([3, null, 3], 0.5).slice(-1), [3]);
  });

  test("alpha 0 is no smoothing; alpha outside [0, 1) is refused", () => {
    assert.deepEqual(smooth([1, 5, 2], 0), [1, 5, 2]);
    assert.throws(() => new Smoother(1), RangeError);
  });

  test("the server's smoothed_loss wins; an EMA fills in when it is missing", () => {
    const run = new RunState();
    run.ingest(stepEvent(1, 1.0, { smoothed_loss: 0.25 }));
    assert.equal(run.smoothed[0], 0.25);
    const fallback = new RunState({ smoothing: 0.5 });
    fallback.ingest(stepEvent(1, 1.0, { smoothed_loss: undefined }));
    fallback.ingest(stepEvent(2, 0.0, { smoothed_loss: null }));
    assert.equal(fallback.smoothed[0], 1.0);
    assert.ok(Math.abs(fallback.smoothed[1] - (0.25 / 0.75)) < 1e-12); // ema 0.25, debias 0.75
  });
});

describe("state changes", () => {
  test("waiting before any event", () => {
    const run = new RunState();
    assert.equal(run.state, "waiting");
    assert.equal(statusLines(run.summary()).head, "Waiting for a run");
  });

  test("info -> caching (images counted apart from steps) -> training -> checkpoint -> training", () => {
    const run = new RunState();
    run.ingest(status("info", "bf16 weights, fp32 LoRA", 0, 100));
    assert.equal(run.state, "starting");
    run.ingest(status("caching", "caching 12 images", 0, 12));
    run.ingest(status("caching", "cached a.png", 4, 12));
    assert.equal(run.state, "caching");
    assert.deepEqual(run.caching, { done: 4, total: 12 });
    assert.equal(run.total, 100, "caching's total is images, not steps");
    assert.equal(stateLabel(run.summary()), "Caching 4/12");
    assert.equal(statusLines(run.summary()).message, "cached a.png");
    assert.equal(statusLines(run.summary()).head, "Caching 4/12", "no step 0/100 before training");
    run.ingest(status("training", "training 96 tensors", 0, 100));
    assert.equal(run.state, "training");
    run.ingest(stepEvent(1, 0.5));
    run.ingest(stepEvent(2, 0.4));
    assert.equal(run.step, 2);
    assert.equal(run.total, 100);
    run.ingest(status("checkpoint", "checkpoint at step 2: /out/ckpt", 2, 100));
    assert.equal(run.state, "checkpoint");
    assert.deepEqual(run.checkpoints, [2]);
    assert.match(statusLines(run.summary()).message, /checkpoint at step 2/);
    run.ingest(stepEvent(3, 0.3));
    assert.equal(run.state, "training", "the next step leaves the checkpoint state");
  });

  for (const end of ["finished", "cancelled", "failed"]) {
    test(`ends ${end}, with the server's message and no ETA`, () => {
      const run = fromHistory(runEvents({ end }));
      assert.equal(run.state, end);
      assert.equal(run.steps.length, 10);
      assert.equal(run.step, 10, "a failed event's step 0 does not reset the step");
      const lines = statusLines(run.summary());
      assert.ok(lines.head.startsWith(end[0].toUpperCase() + end.slice(1)));
      assert.ok(!lines.head.includes("ETA"));
      assert.ok(lines.message.length > 0);
    });
  }

  test("a new run (info after the end) starts a fresh chart", () => {
    const run = fromHistory(runEvents());
    run.ingest(status("info", "bf16 weights", 0, 50));
    assert.equal(run.state, "starting");
    assert.equal(run.steps.length, 0);
    assert.equal(run.total, 50);
    assert.deepEqual(run.checkpoints, []);
  });

  test("resume info mid-run keeps the phase; a run without a terminal event resets on its next info", () => {
    const run = new RunState();
    run.ingest(status("info", "bf16", 0, 100));
    run.ingest(status("caching", "caching", 0, 2));
    run.ingest(status("info", "resumed from step 40", 40, 100));
    assert.equal(run.state, "caching");
    assert.equal(run.step, 40);
    run.ingest(stepEvent(41, 0.3));
    run.ingest(status("info", "bf16", 0, 100)); // the server restarted and ran again
    assert.equal(run.steps.length, 0);
  });

  test("a step going backwards is a new run whose start was missed", () => {
    const run = new RunState();
    for (let s = 1; s <= 5; s++) run.ingest(stepEvent(s, 0.5));
    run.ingest(stepEvent(1, 0.9));
    assert.deepEqual(run.steps, [1]);
    assert.deepEqual(run.loss, [0.9]);
  });

  test("a step with the last step number is a duplicate (history and socket overlap)", () => {
    const run = fromHistory(runEvents({ end: "none" }));
    const version = run.version;
    assert.equal(run.ingest(stepEvent(10, 123)), false);
    assert.equal(run.version, version);
    assert.equal(run.steps.length, 10);
  });

  test("run ids and sequence numbers, when the server sends them, split runs and drop repeats", () => {
    const run = new RunState();
    run.ingest({ ...stepEvent(1, 0.5), run: "a", seq: 1 });
    run.ingest({ ...stepEvent(2, 0.5), run: "a", seq: 2 });
    assert.equal(run.ingest({ ...status("checkpoint", "c", 2, 100), run: "a", seq: 2 }), false);
    run.ingest({ ...stepEvent(5, 0.1), run: "b", seq: 1 });
    assert.deepEqual(run.steps, [5]);
  });

  test("data.losses on a resume event seeds the steps before it", () => {
    const run = new RunState();
    run.ingest(status("info", "resumed from step 3", 3, 10, { losses: [0.9, 0.8, 0.7] }));
    run.ingest(stepEvent(4, 0.6));
    assert.deepEqual(run.steps, [1, 2, 3, 4]);
    assert.equal(run.smoothed[0], 0.9);
  });

  test("unknown kinds and junk are ignored", () => {
    const run = new RunState();
    assert.equal(run.ingest(null), false);
    assert.equal(run.ingest({ kind: "nope" }), false);
    assert.equal(run.ingest({ kind: "step", step: "x" }), false);
    assert.equal(run.state, "waiting");
  });
});

describe("status line", () => {
  test("step/total, s/step, ETA, lr, peak memory of total", () => {
    const run = new RunState();
    run.ingest(stepEvent(40, 0.5, { eta_seconds: 3725, seconds_per_step: 1.234, lr: 2e-4 }));
    const s = run.summary();
    assert.equal(s.peakMemoryGiB, 20);
    assert.equal(s.memoryTotalGiB, 80);
    const lines = statusLines(s);
    assert.equal(lines.head, "Training  ·  step 40/100  ·  ETA 1:02:05");
    assert.equal(lines.detail, "1.23 s/step  ·  lr 2.0e-4  ·  peak 20.0 / 80.0 GiB");
    assert.equal(lines.message, "");
  });

  test("CPU: memory_total_bytes 0 (or missing) leaves the total out; no peak leaves memory out", () => {
    const run = new RunState();
    run.ingest(stepEvent(1, 0.5, { memory_total_bytes: 0, peak_memory_bytes: 3 * GIB }));
    assert.match(statusLines(run.summary()).detail, /peak 3\.0 GiB$/);
    const cpu = new RunState();
    cpu.ingest(stepEvent(1, 0.5, { memory_total_bytes: undefined, peak_memory_bytes: 0 }));
    assert.ok(!statusLines(cpu.summary()).detail.includes("peak"));
  });

  test("peak memory is the highest seen", () => {
    const run = new RunState();
    run.ingest(stepEvent(1, 0.5, { peak_memory_bytes: 30 * GIB }));
    run.ingest(stepEvent(2, 0.5, { peak_memory_bytes: 25 * GIB }));
    assert.equal(run.summary().peakMemoryGiB, 30);
  });
});

describe("formatting", () => {
  test("ETA as h:mm:ss", () => {
    assert.equal(formatDuration(0), "0:00:00");
    assert.equal(formatDuration(59.4), "0:00:59");
    assert.equal(formatDuration(59.6), "0:01:00");
    assert.equal(formatDuration(3725), "1:02:05");
    assert.equal(formatDuration(100000), "27:46:40");
  });

  test("unknown durations", () => {
    for (const v of [NaN, null, undefined, -1, Infinity]) assert.equal(formatDuration(v), "--:--");
  });

  test("GiB, learning rates", () => {
    assert.equal(formatGiB(1.5 * GIB), "1.5");
    assert.equal(formatGiB(0), "");
    assert.equal(formatLr(1e-4), "1.0e-4");
    assert.equal(formatLr(1), "1");
    assert.equal(formatLr(0.05), "0.05");
    assert.equal(formatLr(NaN), "");
  });
});

describe("decimation", () => {
  test("10,000 points -> at most 4 per bucket, keeping the extremes and the ends", () => {
    const n = 10000;
    const xs = Array.from({ length: n }, (_, i) => i + 1);
    const ys = xs.map((x) => Math.sin(x / 50) + (x === 7777 ? 5 : 0) - (x === 1234 ? 3 : 0));
    const out = decimate(xs, ys, { x0: 0, x1: n, buckets: 300 });
    assert.ok(out.xs.length <= 4 * 300, `got ${out.xs.length} points`);
    assert.ok(out.xs.length >= 300);
    assert.equal(Math.max(...out.ys), Math.max(...ys));
    assert.equal(Math.min(...out.ys), Math.min(...ys));
    assert.ok(out.xs.includes(7777) && out.xs.includes(1234));
    assert.equal(out.xs[0], 1);
    assert.equal(out.xs.at(-1), n);
    for (let i = 1; i < out.xs.length; i++) assert.ok(out.xs[i] > out.xs[i - 1], "x stays increasing");
  });

  test("every bucket's min and max survive", () => {
    const n = 5000, buckets = 100;
    const xs = Array.from({ length: n }, (_, i) => i);
    const ys = xs.map((x) => ((x * 7919) % 101) / 100);
    const out = decimate(xs, ys, { x0: 0, x1: n, buckets });
    for (let b = 0; b < buckets; b++) {
      const inB = (x) => Math.floor((x / n) * buckets) === b;
      const src = ys.filter((_, i) => inB(xs[i]));
      const kept = out.ys.filter((_, i) => inB(out.xs[i]));
      assert.equal(Math.max(...kept), Math.max(...src));
      assert.equal(Math.min(...kept), Math.min(...src));
    }
  });

  test("100,000 points decimate in well under a frame budget", () => {
    const n = 100000;
    const xs = Float64Array.from({ length: n }, (_, i) => i);
    const ys = Float64Array.from(xs, (x) => Math.random());
    const t0 = performance.now();
    const out = decimate(xs, ys, { x0: 0, x1: n, buckets: 600 });
    const ms = performance.now() - t0;
    assert.ok(out.xs.length <= 2400);
    assert.ok(ms < 200, `took ${ms} ms`);
  });

  test("few points come back as they are", () => {
    const out = decimate([1, 2, 3], [0.5, 0.4, 0.3], { x0: 0, x1: 3, buckets: 300 });
    assert.deepEqual(out, { xs: [1, 2, 3], ys: [0.5, 0.4, 0.3] });
  });

  test("a non-finite value breaks the line (NaN marker), once", () => {
    const n = 2000;
    const xs = Array.from({ length: n }, (_, i) => i);
    const ys = xs.map((x) => (x >= 1000 && x < 1010 ? NaN : 1));
    const out = decimate(xs, ys, { x0: 0, x1: n, buckets: 50 });
    assert.equal(out.ys.filter(Number.isNaN).length, 1);
    const small = decimate([1, 2, 3], [1, null, 2], { x0: 0, x1: 3, buckets: 10 });
    assert.ok(Number.isNaN(small.ys[1]));
  });
});

describe("axis ranges and ticks", () => {
  test("padding around the data", () => {
    const [lo, hi] = axisRange([1, 2, 3], { pad: 0.1 });
    assert.ok(Math.abs(lo - 0.8) < 1e-12 && Math.abs(hi - 3.2) < 1e-12);
  });

  test("a single point and equal values get a span around them", () => {
    const [lo, hi] = axisRange([0.42]);
    assert.ok(lo < 0.42 && hi > 0.42);
    assert.deepEqual(axisRange([0, 0, 0]), [-0.5, 0.5]);
    const [a, b] = lossRange([0.3], [0.3]);
    assert.ok(a < 0.3 && b > 0.3);
  });

  test("NaN, null and nothing give a usable range", () => {
    assert.deepEqual(axisRange([]), [0, 1]);
    assert.deepEqual(axisRange([NaN, null, undefined, Infinity]), [0, 1]);
    const [lo, hi] = axisRange([NaN, 2, NaN, 4]);
    assert.ok(lo < 2 && hi > 4 && Number.isFinite(lo) && Number.isFinite(hi));
    assert.deepEqual(lossRange([], []), [0, 1]);
  });

  test("loss range ignores rare spikes in the raw loss but keeps the smoothed line", () => {
    const raw = Array.from({ length: 1000 }, (_, i) => (i === 500 ? 50 : 0.4 + (i % 10) / 100));
    const smoothed = raw.map(() => 0.45);
    const [lo, hi] = lossRange(raw, smoothed);
    assert.ok(hi < 1, `spike flattened the curve: hi=${hi}`);
    assert.ok(lo <= 0.4);
  });

  test("step range runs to the run's total; a lone step still has width", () => {
    assert.deepEqual(stepRange([1, 2, 3], 100), [0, 100]);
    assert.deepEqual(stepRange([41, 42], 100), [40, 100]);
    assert.deepEqual(stepRange([], 0), [0, 1]);
    assert.deepEqual(stepRange([5], 0), [4, 5]);
  });

  test("nice ticks are round, inside the range and few", () => {
    assert.deepEqual(niceTicks(0, 100, 5), [0, 20, 40, 60, 80, 100]);
    const t = niceTicks(0.312, 0.587, 4);
    assert.deepEqual(t, [0.35, 0.4, 0.45, 0.5, 0.55]);
    assert.deepEqual(niceTicks(1, 1, 5), []);
    assert.deepEqual(niceTicks(NaN, 1, 5), []);
  });

  test("step ticks are whole steps", () => {
    assert.deepEqual(stepTicks(0, 1, 5), [0, 1]);
    assert.deepEqual(stepTicks(0, 12, 5), [0, 5, 10]);
  });

  test("tick labels", () => {
    const t = niceTicks(0.312, 0.587, 4);
    assert.deepEqual(t.map((v) => formatTick(v, t)), ["0.35", "0.40", "0.45", "0.50", "0.55"]);
    const big = niceTicks(0, 50000, 5);
    assert.equal(formatTick(big[1], big), "10k");
    assert.equal(formatTick(500, [0, 500, 1000]), "500");
  });
});

describe("history rebuild", () => {
  test("fromHistory gives the same state as the live events", () => {
    const events = runEvents({ steps: 20, end: "finished" });
    const live = new RunState();
    for (const e of events) live.ingest(e);
    const rebuilt = fromHistory(events);
    for (const key of ["state", "message", "step", "total", "steps", "loss", "smoothed", "checkpoints", "lr"]) {
      assert.deepEqual(rebuilt[key], live[key], key);
    }
  });

  test("mid-run history, then the live events that overlap it", () => {
    const events = runEvents({ steps: 30, end: "none", saveEvery: 100 });
    const cut = events.findIndex((e) => e.kind === "step" && e.step === 20);
    const run = fromHistory(events.slice(0, cut + 1));
    assert.equal(run.state, "training");
    assert.equal(run.step, 20);
    // Buffered socket events start before the server took its snapshot.
    const buffered = events.slice(cut - 3);
    const fresh = eventsAfter(events.slice(0, cut + 1), buffered);
    assert.equal(fresh[0].step, 21);
    run.ingestAll(fresh);
    assert.deepEqual(run.steps, Array.from({ length: 30 }, (_, i) => i + 1));
    assert.equal(run.state, "training");
  });

  test("eventsAfter: no overlap keeps every live event; empty history keeps all", () => {
    const events = runEvents({ steps: 10, end: "none", saveEvery: 100 });
    assert.deepEqual(eventsAfter(events.slice(0, 5), events.slice(7)), events.slice(7));
    assert.deepEqual(eventsAfter([], events.slice(2)), events.slice(2));
    assert.deepEqual(eventsAfter(events, []), []);
    assert.deepEqual(eventsAfter(events, events.slice(-2)), []);
  });

  test("history of a finished run, then a new run's live events", () => {
    const old = runEvents({ steps: 10 });
    const next = runEvents({ steps: 5 });
    const run = fromHistory(old);
    run.ingestAll(eventsAfter(old, [...old.slice(-1), ...next]));
    assert.equal(run.state, "finished");
    assert.equal(run.total, 5);
    assert.equal(run.steps.length, 5);
  });

  test("empty or missing history is a waiting chart", () => {
    assert.equal(fromHistory([]).state, "waiting");
    assert.equal(fromHistory(undefined).state, "waiting");
    assert.equal(fromHistory({ not: "a list" }).state, "waiting");
  });
});

describe("validation loss and previews", () => {
  const validation = (step, loss, best) => status("validation", `validation loss ${loss}`, step, 10,
    { validation_loss: loss, best_step: best[0], best_loss: best[1] });
  const preview = (step, n = 2) => status("preview", `${n} previews`, step, 10, {
    seconds: 2.5,
    images: Array.from({ length: n }, (_, k) => ({
      path: `/out/flux2_lora/run/previews/step-${step}-${k}.png`, prompt: `prompt ${k}`, clip_score: 20 + k,
      view: { filename: `step-${step}-${k}.png`, subfolder: "flux2_lora/run/previews", type: "output" },
    })),
  });

  test("validation points are kept beside the loss and the best one is named, without changing the phase", () => {
    const run = new RunState();
    run.ingestAll([status("training", "go", 0, 10), validation(0, 0.9, [0, 0.9]), stepEvent(1, 0.8),
      validation(2, 0.7, [2, 0.7]), stepEvent(2, 0.6), validation(4, 0.75, [2, 0.7])]);
    assert.deepEqual(run.validation.steps, [0, 2, 4]);
    assert.deepEqual(run.validation.losses, [0.9, 0.7, 0.75]);
    assert.deepEqual(run.validation.best, { step: 2, loss: 0.7 });
    assert.equal(run.state, "training");
    assert.match(statusLines(run.summary()).detail, /val 0\.7500 \(best 0\.7000 @ 2\)/);
  });

  test("the latest previews replace the earlier ones and keep where to fetch them", () => {
    const run = new RunState();
    run.ingestAll([status("training", "go", 0, 10), preview(0), stepEvent(1, 0.8), preview(5, 3)]);
    assert.equal(run.previews.step, 5);
    assert.equal(run.previews.images.length, 3);
    assert.deepEqual(run.previews.images[1].view, { filename: "step-5-1.png", subfolder: "flux2_lora/run/previews", type: "output" });
    assert.equal(run.previews.images[2].clipScore, 22);
    assert.equal(run.previews.seconds, 2.5);
  });

  test("a resumed run's earlier validation points come with its resume event", () => {
    const run = fromHistory([status("info", "resumed from step 4", 4, 10,
      { losses: [1, 0.9, 0.8, 0.7], validation: [[0, 1.1], [4, 0.95]] }), stepEvent(5, 0.6)]);
    assert.deepEqual(run.validation.steps, [0, 4]);
    assert.deepEqual(run.validation.best, { step: 4, loss: 0.95 });
  });
});
