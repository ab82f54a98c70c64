// Canvas helpers shared by the pack's drawn widgets (loss chart, vRAM bar): theme colours
// from the front end's CSS variables, and text that fits a width. No side effects on
// import (ComfyUI imports every .js file of the pack as an extension).

// The palette sets these on <html> (dark, light and custom themes alike).
const VARS = {
  fg: "--fg-color",
  bg: "--bg-color",
  inputBg: "--comfy-input-bg",
  text: "--input-text",
  muted: "--descrip-text",
  error: "--error-text",
  border: "--border-color",
};
const FALLBACK = { fg: "#fff", bg: "#202020", inputBg: "#222", text: "#ddd", muted: "#999", error: "#ff4444", border: "#4e4e4e" };

let cached = null;
let cachedAt = 0;

/** Theme colours, re-read at most twice a second (canvas redraws run at frame rate). */
export function themeColors() {
  const now = performance.now();
  if (cached && now - cachedAt < 500) return cached;
  const style = getComputedStyle(document.documentElement);
  const colors = {};
  for (const [key, name] of Object.entries(VARS)) colors[key] = style.getPropertyValue(name).trim() || FALLBACK[key];
  colors.light = luminance(colors.inputBg) > 0.5;
  // Line colours picked for contrast on the plot background of each kind of theme.
  colors.accent = colors.light ? "#1456c8" : "#5aa2ff";
  colors.accentSoft = colors.light ? "rgba(20, 86, 200, 0.35)" : "rgba(90, 162, 255, 0.38)";
  colors.validation = colors.light ? "#c25a00" : "#ff9a3c";
  cached = colors;
  cachedAt = now;
  return colors;
}

/** Relative luminance 0..1 of "#rgb", "#rrggbb" or "rgb(r, g, b)"; 0 when unparsable. */
export function luminance(color) {
  let r, g, b;
  const hex = /^#([0-9a-f]{3}|[0-9a-f]{6})$/i.exec(color);
  if (hex) {
    const h = hex[1].length === 3 ? [...hex[1]].map((c) => c + c).join("") : hex[1];
    [r, g, b] = [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
  } else {
    const m = /rgba?\(\s*([\d.]+)[,\s]+([\d.]+)[,\s]+([\d.]+)/i.exec(color);
    if (!m) return 0;
    [r, g, b] = m.slice(1, 4).map(Number);
  }
  return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
}

/** `text` cut with an ellipsis to fit `maxWidth` in the context's current font. */
export function fitText(ctx, text, maxWidth) {
  if (!text || ctx.measureText(text).width <= maxWidth) return text ?? "";
  let lo = 0, hi = text.length;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (ctx.measureText(text.slice(0, mid) + "…").width <= maxWidth) lo = mid;
    else hi = mid - 1;
  }
  return lo > 0 ? text.slice(0, lo) + "…" : "";
}

/** Words of `text` wrapped into at most `maxLines` lines of `maxWidth` (the last one cut). */
export function wrapText(ctx, text, maxWidth, maxLines) {
  const words = String(text ?? "").split(/\s+/).filter(Boolean);
  const lines = [];
  let line = "";
  for (let i = 0; i < words.length; i++) {
    const next = line ? `${line} ${words[i]}` : words[i];
    if (ctx.measureText(next).width <= maxWidth || !line) {
      line = next;
      continue;
    }
    if (lines.length === maxLines - 1) {
      line = `${line} ${words.slice(i).join(" ")}`;
      break;
    }
    lines.push(line);
    line = words[i];
  }
  if (line) lines.push(line);
  return lines.slice(0, maxLines).map((l) => fitText(ctx, l, maxWidth));
}

/** Rounded rectangle path (ctx.roundRect is missing in some older browsers). */
export function roundRect(ctx, x, y, w, h, r) {
  ctx.beginPath();
  if (ctx.roundRect) {
    ctx.roundRect(x, y, w, h, r);
    return;
  }
  ctx.rect(x, y, w, h);
}

/** Redraw a widget's node once per animation frame however many events arrive. */
export function frameThrottle(fn) {
  let pending = 0;
  return () => {
    if (pending) return;
    pending = requestAnimationFrame(() => {
      pending = 0;
      fn();
    });
  };
}

/** Ask the canvas (classic nodes) and the widget's own canvas (Vue nodes) to redraw. */
export function redrawWidget(node, widget) {
  node.setDirtyCanvas?.(true, false);
  node.graph?.setDirtyCanvas?.(true, false);
  widget.triggerDraw?.(); // set by the Vue nodes renderer for canvas-drawn widgets
}
