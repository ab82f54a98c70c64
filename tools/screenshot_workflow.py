"""Load a UI-format workflow into a running ComfyUI's front end and save a PNG of it.

Opens the server's page in headless Chromium (through Playwright), waits for the
front end to start, loads the workflow with ``app.loadGraphData(workflow)`` as the
page does for a template or a dropped file, and writes a screenshot. It also
prints a JSON report of what the page made of the workflow: the node types it does
not know (`missing`, the red "missing node" boxes), nodes it marks with an error
(`errors`, e.g. a model file that is not installed), links whose ends did not connect
(`broken`), nodes that overlap (`overlaps`) or are smaller than their widgets need
(`tooSmall`), and page errors. ``--saved`` writes the workflow as the page would save
it again and ``--prompt`` the API prompt it would queue, for comparing with the file.

    python tools/screenshot_workflow.py http://127.0.0.1:8188 example_workflows/x.json \\
        --out /tmp/x.png [--fit] [--saved /tmp/x.saved.json] [--prompt /tmp/x.api.json]

Needs the ``playwright`` Python package and a Chromium. It uses Playwright's own
browser when one is installed (``playwright install chromium``), else the first of
``chromium``, ``chromium-browser``, ``google-chrome`` on PATH (Debian:
``apt-get install chromium``); ``--browser PATH`` picks one. Exit status 1 when the
page reports unknown node types or broken links, 2 when the page or the workflow
could not be loaded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

# The page's state after loading: unknown types, links that did not connect, the saved form.
_INSPECT_JS = """
async () => {
  const app = window.app;
  const graph = app.graph;
  const registered = (globalThis.LiteGraph || window.LiteGraph)?.registered_node_types || {};
  const nodes = graph._nodes || graph.nodes || [];
  const missing = [];
  for (const n of nodes) {
    if (!(n.type in registered)) {
      missing.push({id: n.id, type: n.type});
    }
  }
  // What Save / Export writes, and the prompt Run would queue.
  const {workflow: saved, output: prompt} = await app.graphToPrompt();
  const nodeIds = new Set(nodes.map(n => n.id));
  const broken = [];
  for (const l of saved.links || []) {
    const [id, from, fromSlot, to, toSlot] = Array.isArray(l) ? l : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot];
    const src = graph.getNodeById(from), dst = graph.getNodeById(to);
    const ok = src && dst && (dst.inputs?.[toSlot]?.link === id) && (src.outputs?.[fromSlot]?.links || []).includes(id);
    if (!ok) broken.push(id);
  }
  const overlaps = [];
  const box = n => { const [x, y] = n.pos, [w, h] = n.size, t = (globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30);
                     return [x, y - t, x + w, y + h]; };
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = box(nodes[i]), b = box(nodes[j]);
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]) overlaps.push([nodes[i].id, nodes[j].id]);
  }
  const tooSmall = [];
  for (const n of nodes) {
    if (!n.computeSize) continue;
    const [w, h] = n.computeSize();
    if (n.size[0] + 1 < w || n.size[1] + 1 < h) tooSmall.push({id: n.id, type: n.type, size: n.size, needs: [w, h]});
  }
  const errors = nodes.filter(n => n.has_errors).map(n => ({id: n.id, type: n.type}));
  return {nodes: nodes.length, links: (saved.links || []).length, missing, errors, broken, overlaps, tooSmall, saved, prompt};
}
"""


# Fit every node into the visible canvas (screen = (pos + offset) * scale), as "Fit view" does.
_FIT_JS = """
() => {
  const c = window.app.canvas, ns = window.app.graph._nodes, title = 30, pad = 40;
  if (!ns.length) return;
  const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - title));
  const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
  // The side bar and the top menu lie over the canvas: keep the nodes clear of them.
  const rect = c.canvas.getBoundingClientRect(), left = 80, top = 100;
  const w = rect.width - left - pad, h = rect.height - top - pad;
  const scale = Math.min(1, w / (x1 - x0), h / (y1 - y0));
  c.ds.scale = scale;
  c.ds.offset[0] = (left + (w - (x1 - x0) * scale) / 2) / scale - x0;
  c.ds.offset[1] = (top + (h - (y1 - y0) * scale) / 2) / scale - y0;
  c.setDirty(true, true);
}
"""


def find_browser(playwright, explicit: str | None) -> str | None:
    """A Chromium executable for Playwright, or None to use Playwright's own download."""
    if explicit:
        return explicit
    try:
        bundled = playwright.chromium.executable_path
    except Exception:  # no browser downloaded for this Playwright
        bundled = None
    if bundled and Path(bundled).exists():
        return None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: install one (apt-get install chromium) or pass --browser PATH")


def screenshot(url: str, workflow: dict, out: Path, *, width: int = 1920, height: int = 1080,
               fit: bool = False, wait_ms: int = 1500, browser_path: str | None = None,
               timeout_ms: int = 60000) -> dict:
    """Load `workflow` in the front end at `url`, save a PNG to `out`, return the page's report."""
    from playwright.sync_api import sync_playwright

    console: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_browser(p, browser_path), headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.goto(url, wait_until="domcontentloaded", timeout=timeout_ms)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && "
                                   "window.LiteGraph && Object.keys(window.LiteGraph.registered_node_types).length > 10",
                                   timeout=timeout_ms)
            page.wait_for_timeout(wait_ms)
            # First-run dialogs (template browser, sign-in) would cover the canvas.
            for _ in range(3):
                page.keyboard.press("Escape")
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf, true, true, null); }", workflow)
            if fit:
                page.evaluate(_FIT_JS)
            page.wait_for_timeout(wait_ms)
            for _ in range(2):
                page.keyboard.press("Escape")
            page.mouse.move(width - 5, height - 5)
            page.wait_for_timeout(300)
            report = page.evaluate(_INSPECT_JS)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()
    report["console"] = console
    report["png"] = str(out)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="ComfyUI server, e.g. http://127.0.0.1:8188/")
    ap.add_argument("workflow", type=Path, help="UI-format workflow JSON")
    ap.add_argument("--out", type=Path, help="PNG to write (default: the workflow's name with .png in the working folder)")
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    ap.add_argument("--fit", action="store_true", help="fit all nodes into the view instead of the workflow's saved view")
    ap.add_argument("--wait", type=int, default=1500, help="milliseconds to let the page settle after each step")
    ap.add_argument("--browser", help="Chromium executable (default: Playwright's, else chromium on PATH)")
    ap.add_argument("--saved", type=Path, help="also write the workflow as the page would save it (Export)")
    ap.add_argument("--prompt", type=Path, help="also write the API prompt the page would queue on Run")
    args = ap.parse_args(argv)

    try:
        workflow = json.loads(args.workflow.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"cannot read {args.workflow}: {e}", file=sys.stderr)
        return 2
    out = args.out or Path(args.workflow.stem + ".png")
    try:
        report = screenshot(args.url, workflow, out, width=args.width, height=args.height, fit=args.fit,
                            wait_ms=args.wait, browser_path=args.browser)
    except Exception as e:  # Playwright's timeouts and page errors
        print(f"could not load the workflow in {args.url}: {e}", file=sys.stderr)
        return 2
    saved, prompt = report.pop("saved"), report.pop("prompt")
    for path, data in ((args.saved, saved), (args.prompt, prompt)):
        if path:
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 1 if report["missing"] or report["broken"] else 0


if __name__ == "__main__":
    sys.exit(main())
