// Unit tests of web/vram_data.js (the vRAM bar's data side): node --test tests/web/
import { test, describe } from "node:test";
import assert from "node:assert/strict";

import {
  inputNode, findModelLoader, widgetValues, buildEstimateRequest, parseEstimate, barLayout, gib, headline,
} from "../../web/vram_data.js";

const GIB = 1024 ** 3;

/** A litegraph-like node: inputs by name, widgets, and getInputNode(slot) over a link table. */
class FakeNode {
  constructor(type, { inputs = [], widgets = {} } = {}) {
    this.type = type;
    this.inputs = inputs.map((name) => ({ name, link: null }));
    this.widgets = Object.entries(widgets).map(([name, value]) => ({ name, value, options: {} }));
    this.sources = [];
  }

  connect(name, source) {
    const slot = this.inputs.findIndex((i) => i.name === name);
    this.inputs[slot].link = 1;
    this.sources[slot] = source;
    return this;
  }

  getInputNode(slot) {
    return this.sources[slot] ?? null;
  }
}

const unet = () => new FakeNode("UNETLoader", { widgets: { unet_name: "flux-2-klein-base-4b.safetensors", weight_dtype: "fp8_e4m3fn" } });
const config = () => new FakeNode("Flux2LoraConfig", { widgets: { subject: "character", quick_preset: "fast", rank: 0, steps: 0 } });
const dataset = () => new FakeNode("Flux2LoraDataset", { widgets: { folder: "lora_dataset", resolution: 1024, buckets: true } });
const estimate = () => new FakeNode("Flux2VramEstimate", { inputs: ["model", "config", "dataset"] });

describe("graph walk", () => {
  test("the request carries the loader's unet_name and weight_dtype and all config/dataset widgets", () => {
    const node = estimate().connect("model", unet()).connect("config", config()).connect("dataset", dataset());
    assert.deepEqual(buildEstimateRequest(node), {
      unet_name: "flux-2-klein-base-4b.safetensors",
      weight_dtype: "fp8_e4m3fn",
      config: { subject: "character", quick_preset: "fast", rank: 0, steps: 0 },
      dataset: { folder: "lora_dataset", resolution: 1024, buckets: true },
    });
  });

  test("unconnected inputs: null model fields, empty objects", () => {
    assert.deepEqual(buildEstimateRequest(estimate()), { unet_name: null, weight_dtype: null, config: {}, dataset: {} });
  });

  test("links are followed through Reroute nodes", () => {
    const reroute = (src) => new FakeNode("Reroute", { inputs: [""] }).connect("", src);
    const cfg = config();
    const node = estimate().connect("model", reroute(reroute(unet()))).connect("config", reroute(cfg));
    assert.equal(inputNode(node, "config"), cfg);
    assert.equal(buildEstimateRequest(node).unet_name, "flux-2-klein-base-4b.safetensors");
  });

  test("a model-in/model-out node (LoRA loader) between the loader and the estimate", () => {
    const lora = new FakeNode("LoraLoaderModelOnly", { inputs: ["model"], widgets: { lora_name: "x", strength_model: 1 } });
    lora.connect("model", unet());
    const node = estimate().connect("model", lora);
    assert.equal(findModelLoader(node).type, "UNETLoader");
  });

  test("a model from a node with no loader behind it gives null; a cycle ends", () => {
    const a = new FakeNode("ModelThing", { inputs: ["model"] });
    const b = new FakeNode("ModelThing", { inputs: ["model"] });
    a.connect("model", b);
    b.connect("model", a);
    assert.equal(findModelLoader(estimate().connect("model", a)), null);
  });

  test("display-only widgets (result text, charts) and buttons are left out", () => {
    const node = config();
    node.widgets.push({ name: "result", value: "resolved options…", serialize: false, options: { serialize: false } });
    node.widgets.push({ name: "chart", value: "", options: { serialize: false } });
    node.widgets.push({ name: "go", type: "button", value: null, options: {} });
    assert.deepEqual(Object.keys(widgetValues(node)), ["subject", "quick_preset", "rank", "steps"]);
  });

  test("object values are sent as plain JSON", () => {
    const node = new FakeNode("X", { widgets: { box: { a: [1, 2] }, none: undefined } });
    assert.deepEqual(widgetValues(node), { box: { a: [1, 2] }, none: null });
  });
});

describe("answer", () => {
  const answer = {
    total: 30 * GIB,
    available: 80 * GIB,
    verdict: "fits",
    parts: {
      "frozen weights": 16 * GIB,
      "LoRA weights": 1 * GIB,
      "optimizer state": 2 * GIB,
      "activations + grads": 8 * GIB,
      "batch tensors": 1 * GIB,
      "runtime overhead": 1.5 * GIB,
      "something new": 0.5 * GIB,
    },
    advice: ["fits with room to spare", "raise batch_size to 2"],
    text: "…",
  };

  test("parts group into four segments; unknown parts count as other", () => {
    const est = parseEstimate(answer);
    assert.deepEqual(est.segments.map((s) => [s.label, s.bytes / GIB]), [
      ["frozen weights", 16], ["LoRA + optimizer", 3], ["activations", 9], ["runtime / other", 2],
    ]);
    assert.equal(est.verdict, "fits");
    assert.equal(est.available, 80 * GIB);
    assert.deepEqual(est.advice, answer.advice);
  });

  test("an error answer is kept as the error", () => {
    assert.deepEqual(parseEstimate({ error: "no model named x" }), { error: "no model named x" });
    assert.ok(parseEstimate(null).error);
  });

  test("unknown device memory, unknown verdict, missing total", () => {
    const est = parseEstimate({ parts: { "frozen weights": 4 * GIB }, available: null, verdict: "maybe" });
    assert.equal(est.available, null);
    assert.equal(est.verdict, "unknown");
    assert.equal(est.total, 4 * GIB);
    assert.equal(headline(est), "peak ≈ 4.0 GiB  ·  device memory unknown");
    assert.equal(barLayout(est).mark, null);
  });

  test("bar layout: stacked spans in order, the device mark inside the track", () => {
    const layout = barLayout(parseEstimate(answer));
    let at = 0;
    for (const s of layout.spans) {
      assert.ok(Math.abs(s.start - at) < 1e-12);
      at += s.width;
    }
    assert.ok(Math.abs(layout.end - at) < 1e-12);
    assert.ok(layout.mark > layout.end && layout.mark < 1);
  });

  test("does not fit: the bar runs past the device mark, still inside the track", () => {
    const layout = barLayout(parseEstimate({ ...answer, total: 100 * GIB, verdict: "does not fit",
      parts: { "frozen weights": 100 * GIB } }));
    assert.ok(layout.end > layout.mark && layout.end < 1);
  });

  test("headline and GiB", () => {
    assert.equal(headline(parseEstimate(answer)), "peak ≈ 30.0 of 80.0 GiB  ·  fits");
    // cudaMallocAsync with weights cast per op: the pool's high mode is shown, never below the total.
    assert.equal(headline(parseEstimate({ ...answer, upper: 32.5 * GIB })), "peak ≈ 30.0 (up to 32.5) of 80.0 GiB  ·  fits");
    assert.equal(parseEstimate({ ...answer, upper: 1 }).upper, answer.total);
    assert.equal(gib(1.25 * GIB), "1.3");
    assert.equal(gib(null), "0.0");
  });
});
