// Data side of the vRAM Estimate node's bar: which nodes feed the estimate, the JSON
// that POST /flux2_lora/estimate takes, and the response turned into bar segments.
// Pure ES module (graph nodes are read through their plain fields), tested with node --test.

const GIB = 1024 ** 3;
const MAX_HOPS = 16; // a model path longer than this is not a plain loader chain

/** Stacked bar segments and the response parts each one adds up. */
export const SEGMENTS = [
  { label: "frozen weights", short: "weights", parts: ["frozen weights", "weight casts"] },
  { label: "LoRA + optimizer", short: "LoRA + optimizer", parts: ["LoRA weights", "optimizer state"] },
  { label: "activations", short: "activations", parts: ["activations + grads", "batch tensors"] },
  { label: "runtime / other", short: "runtime / other", parts: ["runtime overhead"] }, // and unknown keys
];

export const VERDICTS = ["fits", "tight", "fits with offload", "does not fit", "unknown"];

/** The node feeding input `name` of `node`, through Reroute nodes; null when unconnected. */
export function inputNode(node, name) {
  const slot = node?.inputs?.findIndex((i) => i.name === name) ?? -1;
  if (slot < 0 || node.inputs[slot].link == null) return null;
  let source = node.getInputNode?.(slot) ?? null;
  for (let hops = 0; source && isReroute(source) && hops < MAX_HOPS; hops++) {
    source = source.inputs?.[0]?.link != null ? source.getInputNode?.(0) ?? null : null;
  }
  return source;
}

const isReroute = (node) => node.type === "Reroute";

/**
 * The node that loads the diffusion model behind a "model" input: the first one with a
 * `unet_name` widget, following Reroutes and model-in/model-out nodes (LoRA loaders).
 */
export function findModelLoader(node) {
  let current = inputNode(node, "model");
  const seen = new Set();
  for (let hops = 0; current && hops < MAX_HOPS && !seen.has(current); hops++) {
    seen.add(current);
    if (widget(current, "unet_name")) return current;
    current = inputNode(current, "model");
  }
  return null;
}

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

/** Widget values by name, leaving out display-only widgets (text results, charts, buttons). */
export function widgetValues(node) {
  const values = {};
  for (const w of node?.widgets ?? []) {
    if (!w.name || w.serialize === false || w.options?.serialize === false || w.type === "button") continue;
    values[w.name] = plain(w.value);
  }
  return values;
}

// Widget values can be reactive proxies in the Vue renderer: send plain JSON.
function plain(v) {
  return v != null && typeof v === "object" ? JSON.parse(JSON.stringify(v)) : v ?? null;
}

/**
 * Body of POST /flux2_lora/estimate for an estimate node. Unconnected inputs give
 * `unet_name`/`weight_dtype` null and an empty `config`/`dataset` object.
 */
export function buildEstimateRequest(estimateNode) {
  const loader = findModelLoader(estimateNode);
  return {
    unet_name: loader ? plain(widget(loader, "unet_name")?.value) : null,
    weight_dtype: loader ? plain(widget(loader, "weight_dtype")?.value ?? null) : null,
    config: widgetValues(inputNode(estimateNode, "config")),
    dataset: widgetValues(inputNode(estimateNode, "dataset")),
  };
}

const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : NaN);

/**
 * The route's answer as the bar draws it:
 * { error } or { total, upper, available, verdict, segments: [{label, short, bytes}], advice, text }.
 * `upper` is above `total` where the allocator's pool varies from run to run.
 */
export function parseEstimate(body) {
  if (!body || typeof body !== "object") return { error: "empty answer from the server" };
  if (body.error) return { error: String(body.error) };
  const parts = body.parts && typeof body.parts === "object" ? body.parts : {};
  const known = new Set(SEGMENTS.flatMap((s) => s.parts));
  const segments = SEGMENTS.map((s) => ({ label: s.label, short: s.short, bytes: sum(s.parts.map((p) => parts[p])) }));
  // Parts this version does not know about still count, as "other".
  const other = sum(Object.keys(parts).filter((k) => !known.has(k)).map((k) => parts[k]));
  segments[segments.length - 1].bytes += other;
  let total = num(body.total);
  if (!(total > 0)) total = sum(segments.map((s) => s.bytes));
  const available = num(body.available) > 0 ? body.available : null;
  const upper = num(body.upper) > total ? body.upper : total;
  const verdict = VERDICTS.includes(body.verdict) ? body.verdict : "unknown";
  const advice = Array.isArray(body.advice) ? body.advice.map(String).filter(Boolean) : [];
  return { total, upper, available, verdict, segments, advice, text: typeof body.text === "string" ? body.text : "" };
}

function sum(values) {
  let s = 0;
  for (const v of values) if (num(v) > 0) s += v;
  return s;
}

/** Bar geometry in fractions of the track: segment spans and the device-memory mark. */
export function barLayout(estimate) {
  const { total, available, segments } = estimate;
  // Room past the larger of the two, so the mark and the bar's end are never on the edge.
  const scale = Math.max(total || 0, available || 0) * 1.06 || 1;
  let at = 0;
  const spans = segments.map((s) => {
    const span = { ...s, start: at / scale, width: s.bytes / scale };
    at += s.bytes;
    return span;
  });
  return { spans, end: at / scale, mark: available ? available / scale : null };
}

/** Bytes as GiB with one decimal ("0.0" for under 50 MiB). */
export function gib(bytes) {
  return (num(bytes) > 0 ? bytes / GIB : 0).toFixed(1);
}

/** The bar's headline: "peak ≈ 23.4 of 79.6 GiB · fits", or "peak ≈ 22.3 (up to 24.8) of …". */
export function headline(estimate) {
  const of = estimate.available ? ` of ${gib(estimate.available)}` : "";
  const upto = estimate.upper > estimate.total ? ` (up to ${gib(estimate.upper)})` : "";
  const verdict = estimate.verdict === "unknown" ? "device memory unknown" : estimate.verdict;
  return `peak ≈ ${gib(estimate.total)}${upto}${of} GiB  ·  ${verdict}`;
}
