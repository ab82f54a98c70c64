"""Drive ComfyUI's real front end (comfyui-frontend-package) in headless Chromium through Playwright.

For the end-to-end tests of the pack's front-end widgets: open the page of a test server
(tests/comfyui_harness.py), load a workflow from the template browser as a user would,
edit the graph through `app.graph`, queue it, reload mid-run, wait on the page's events,
read state from the page, and take screenshots of single nodes.

Two things about the page that the helpers take care of: edits made through `app.graph`
reach the front end's change tracker only when someone runs its check (a user's mouse-up
does), so set_widgets/replace_node run it; and a reload restores the graph from a draft the
page saves 0.5 s after a change, so wait_saved() before reloading. Playwright's
wait_for_function takes a returned Promise as true at once: async checks go through poll().

Chromium comes from CHROMIUM_PATH, else the first of chromium, chromium-browser,
google-chrome(-stable) on PATH, else Playwright's own download (`playwright install
chromium`). `.ci/run` installs Debian's `chromium` when it can.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from screenshot_workflow import _FIT_JS  # noqa: E402  every node in view, clear of the side bar and menu

PLAYWRIGHT_MISSING = (
    "needs the playwright Python package: pip install playwright (it is in the test extra: "
    'pip install -e ".[test]"; scripts/bootstrap installs it)'
)
CHROMIUM_MISSING = (
    "needs a Chromium: install one (Debian/Ubuntu: apt-get install chromium; .ci/run does this when it "
    "runs as root), set CHROMIUM_PATH to a Chromium or Chrome executable, or run "
    "`python -m playwright install chromium`"
)
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# The sandbox needs user namespaces that containers often lack; the GPU is not needed.
_LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]

# Messages the page receives over the websocket that the tests watch (the pack's own and ComfyUI's).
WATCHED_EVENTS = ("flux2_lora.progress", "execution_start", "executing", "execution_success",
                  "execution_error", "execution_interrupted", "execution_cached")


def find_chromium() -> str | None:
    """A Chromium executable; "" for Playwright's own download (Playwright picks the build it
    was made for); None when there is none. A CHROMIUM_PATH that names no file is an error."""
    if explicit := os.environ.get("CHROMIUM_PATH"):
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"CHROMIUM_PATH={explicit} is not a file")
        return explicit
    for name in _BROWSER_NAMES:
        if found := shutil.which(name):
            return found
    downloads = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH") or Path.home() / ".cache" / "ms-playwright")
    if any(downloads.glob("chromium*/chrome-linux*/chrome")) or any(downloads.glob("chromium*/chrome-*/headless_shell")):
        return ""
    return None


def skip_reason() -> str | None:
    """Why the browser tests cannot run here (Playwright or Chromium missing), or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return PLAYWRIGHT_MISSING
    try:
        return CHROMIUM_MISSING if find_chromium() is None else None
    except FileNotFoundError:
        return None  # a wrong CHROMIUM_PATH fails in the fixture, with its message


# --------------------------------------------------------------------------- fixtures
# Import these into a test module (`from browser import chromium, comfy_page`), and mark the
# module skipif(skip_reason()) so it skips before the session's ComfyUI server starts. The
# browser is module-scoped: Playwright's sync API keeps an event loop running while it is
# open, and asyncio.run() in later tests (the ComfyUI harness) would refuse to start.


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium (Playwright Browser); skips when Playwright or Chromium is absent."""
    if reason := skip_reason():
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    try:
        path = find_chromium()
    except FileNotFoundError as e:
        pytest.fail(str(e), pytrace=False)
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=path or None, headless=True, args=_LAUNCH_ARGS)
        except Exception as e:  # found but broken: a failure, not a skip
            pytest.fail(f"Chromium {path or '(Playwright download)'} did not start: {e}", pytrace=False)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def comfy_page(chromium, comfy_server):
    """A ComfyPage on the session's ComfyUI server, opened and ready. Its console errors are
    printed at the end (pytest shows them when the test fails)."""
    context = chromium.new_context(viewport={"width": 1600, "height": 1000})
    page = ComfyPage(context.new_page(), comfy_server.url)
    try:
        page.open()
        yield page
    finally:
        print("\n--- page console (errors and warnings) ---\n" + "\n".join(page.console[-60:]))
        context.close()


# --------------------------------------------------------------------------- the page

# Started: node types registered, the websocket open, and the workflow of the last visit (or
# the default one) opened, which comes a few frames after the rest.
_READY_JS = """() => !!(window.app?.vueAppReady && window.app.canvas && window.LiteGraph
  && Object.keys(window.LiteGraph.registered_node_types).length > 10
  && window.app.api?.socket?.readyState === 1 && window.app.extensionManager?.workflow?.activeWorkflow)"""

# Record the watched websocket messages into window.__e2e.events (from page load on).
_RECORD_JS = """(kinds) => {
  if (window.__e2e) return;
  window.__e2e = {events: [], t0: performance.now()};
  for (const kind of kinds) {
    window.app.api.addEventListener(kind, (e) => {
      window.__e2e.events.push({type: kind, t: performance.now() - window.__e2e.t0, data: e.detail});
    });
  }
}"""

# Replace a node by a new node of another type at the same place, keeping its output links
# (by output type) and the links into inputs of the same name; returns the new node's id.
# The change tracker's check ends it, as after a user's edit.
_REPLACE_JS = """([id, type, values]) => {
  const graph = window.app.graph;
  const old = graph.getNodeById(id);
  if (!old) throw new Error(`no node ${id}`);
  const node = window.LiteGraph.createNode(type);
  if (!node) throw new Error(`the page does not know the node type ${type}`);
  node.pos = [...old.pos];
  graph.add(node);
  const link = (lid) => graph.links.get ? graph.links.get(lid) : graph.links[lid];
  for (const out of old.outputs ?? []) {
    const slot = node.outputs.findIndex((o) => o.type === out.type);
    for (const lid of [...(out.links ?? [])]) {
      const l = link(lid);
      if (slot < 0) throw new Error(`${type} has no ${out.type} output`);
      node.connect(slot, graph.getNodeById(l.target_id), l.target_slot);
    }
  }
  for (const input of old.inputs ?? []) {
    const slot = node.inputs?.findIndex((i) => i.name === input.name) ?? -1;
    if (input.link == null || slot < 0) continue;
    const l = link(input.link);
    graph.getNodeById(l.origin_id).connect(l.origin_slot, node, slot);
  }
  graph.remove(old);
  for (const [name, value] of Object.entries(values ?? {})) {
    const w = node.widgets?.find((w) => w.name === name);
    if (!w) throw new Error(`${type} has no widget ${name}`);
    w.value = value;
  }
  graph.setDirtyCanvas(true, true);
  window.app.extensionManager.workflow.activeWorkflow?.changeTracker?.checkState();
  return node.id;
}"""

# Set widget values as a user edit does: value, the widget's callback, the node's hook, and the
# change tracker's check (a user's mouse-up or key-up runs it), which sends graphChanged.
_SET_WIDGETS_JS = """([id, values]) => {
  const node = window.app.graph.getNodeById(id);
  if (!node) throw new Error(`no node ${id}`);
  for (const [name, value] of Object.entries(values)) {
    const w = node.widgets?.find((w) => w.name === name);
    if (!w) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
    const old = w.value;
    w.value = value;
    w.callback?.(w.value, window.app.canvas, node, [0, 0], undefined);
    node.onWidgetChanged?.(name, w.value, old, w);
  }
  window.app.graph.setDirtyCanvas(true, true);
  window.app.extensionManager.workflow.activeWorkflow?.changeTracker?.checkState();
  return Object.fromEntries(node.widgets.map((w) => [w.name, w.value]));
}"""

_OVERLAPS_JS = """() => {
  const nodes = window.app.graph.nodes, out = [];
  const box = (n) => {
    const t = n.constructor.title_height ?? window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
    return [n.pos[0], n.pos[1] - t, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  };
  for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
    const a = box(nodes[i]), b = box(nodes[j]);
    if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]) {
      out.push([nodes[i].id, nodes[i].type, nodes[j].id, nodes[j].type]);
    }
  }
  return out;
}"""

# True once the page has saved the graph as it is now (nodes, widget values, links) as a draft
# in localStorage, from where a reload restores it. The front end saves 0.5 s after a change.
_DRAFT_SAVED_JS = """() => {
  const summary = (g) => JSON.stringify([
    [...g.nodes].sort((a, b) => a.id - b.id).map((n) => [n.id, n.type, n.mode, n.widgets_values ?? null]),
    [...(g.links ?? [])].map((l) => Array.isArray(l) ? l.slice(0, 5) : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot])
      .sort((a, b) => a[0] - b[0])]);
  const now = summary(window.app.rootGraph.serialize());
  for (const key of Object.keys(localStorage)) {
    if (!key.startsWith('Comfy.Workflow.Draft.')) continue;
    try {
      if (summary(JSON.parse(JSON.parse(localStorage.getItem(key)).data)) === now) return true;
    } catch (e) { /* another kind of entry */ }
  }
  return false;
}"""

# The node's box on the screen (CSS pixels), title bar included, and the canvas scale.
_NODE_RECT_JS = """(id) => {
  const app = window.app, node = app.graph.getNodeById(id);
  if (!node) throw new Error(`no node ${id}`);
  const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect();
  const title = node.constructor.title_height ?? window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  const [x0, y0] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] - title]);
  const [x1, y1] = ds.convertOffsetToCanvas([node.pos[0] + node.size[0], node.pos[1] + node.size[1]]);
  return {x: rect.left + x0, y: rect.top + y0, width: x1 - x0, height: y1 - y0, scale: ds.scale};
}"""

# Put the node in front of the others, in the middle of the canvas at scale 1 (or smaller, so it fits).
_FOCUS_JS = """([id, margin]) => {
  const app = window.app, node = app.graph.getNodeById(id), ds = app.canvas.ds;
  app.canvas.bringToFront?.(node);
  const rect = app.canvas.canvas.getBoundingClientRect();
  const title = node.constructor.title_height ?? window.LiteGraph.NODE_TITLE_HEIGHT ?? 30;
  const w = node.size[0], h = node.size[1] + title;
  ds.scale = Math.min(1, (rect.width - 2 * margin) / w, (rect.height - 2 * margin) / h);
  ds.offset[0] = (rect.width / 2) / ds.scale - (node.pos[0] + w / 2);
  ds.offset[1] = (rect.height / 2) / ds.scale - (node.pos[1] - title + h / 2);
  app.canvas.setDirty(true, true);
}"""


class PageError(AssertionError):
    """The page did not reach an expected state; the message says which and what it showed."""


class ComfyPage:
    """ComfyUI's page in a Playwright Page, with the steps a user takes as methods."""

    def __init__(self, page, url: str, timeout_ms: int = 60_000):
        self.page = page
        self.url = url.rstrip("/") + "/"
        self.timeout_ms = timeout_ms
        self.console: list[str] = []
        page.set_default_timeout(timeout_ms)
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))

    # -- loading

    def open(self) -> "ComfyPage":
        self.page.goto(self.url, wait_until="domcontentloaded")
        return self.wait_ready()

    def reload(self) -> "ComfyPage":
        self.page.reload(wait_until="domcontentloaded")
        return self.wait_ready()

    def wait_ready(self) -> "ComfyPage":
        """Wait for the app, its node types, the websocket and the open workflow; record events."""
        self.wait_for(_READY_JS, what="the ComfyUI front end to start")
        self.page.evaluate(_RECORD_JS, list(WATCHED_EVENTS))
        self.close_dialogs()
        return self

    def close_dialogs(self) -> None:
        """Close what covers the canvas on a first visit (template browser, notices)."""
        dialogs = self.page.locator("[role=dialog]:visible")
        for _ in range(3):
            if not dialogs.count():
                return
            self.page.keyboard.press("Escape")
            try:
                dialogs.first.wait_for(state="hidden", timeout=2000)
            except Exception as e:  # this one does not close on Escape: tell what it says
                if type(e).__name__ != "TimeoutError":
                    raise
        if dialogs.count():
            raise PageError(f"a dialog stays over the page: {dialogs.first.inner_text()[:500]!r}")

    def load_template(self, pack: str, name: str) -> None:
        """Open the template browser, pick the pack under Extensions, click the template's card."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(pack, exact=True).click()
        dialog.get_by_text(name, exact=True).click()
        dialog.wait_for(state="hidden")
        self.wait_for("(name) => window.app.extensionManager.workflow.activeWorkflow?.path?.endsWith(`/${name}.json`)",
                      name, what=f"the template {name} to open")

    def overlaps(self) -> list[list]:
        """Pairs of nodes whose boxes (title bar included) overlap, as [id, type, id, type]."""
        self.next_frames()  # sizes settle on the first draws
        return self.page.evaluate(_OVERLAPS_JS)

    def graph_nodes(self) -> list[dict]:
        return self.page.evaluate("""() => window.app.graph.nodes.map((n) => ({id: n.id, type: n.type,
            widgets: Object.fromEntries((n.widgets ?? []).map((w) => [w.name, w.value]))}))""")

    # -- editing

    def node_ids(self, node_type: str) -> list[int]:
        return self.page.evaluate("(t) => window.app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)",
                                  node_type)

    def node_id(self, node_type: str) -> int:
        ids = self.node_ids(node_type)
        if len(ids) != 1:
            raise PageError(f"expected one {node_type} in the graph, found {ids}")
        return ids[0]

    def replace_node(self, node_id: int, new_type: str, widgets: dict | None = None) -> int:
        """Swap a node for another type, links kept; returns the new node's id."""
        return self.page.evaluate(_REPLACE_JS, [node_id, new_type, widgets or {}])

    def set_widgets(self, node_id: int, values: dict) -> dict:
        """Set widgets as a user edit would; returns all the node's widget values."""
        return self.page.evaluate(_SET_WIDGETS_JS, [node_id, values])

    def wait_saved(self) -> None:
        """Wait until the page has saved the graph as it is now for a reload to restore."""
        self.wait_for(_DRAFT_SAVED_JS, what="the page to save the graph in its storage", polling=100)

    # -- running

    def queue(self) -> str:
        """Queue the graph as Run does (`app.queuePrompt(0)`); returns the prompt id."""
        with self.page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as answer:
            self.page.evaluate("() => window.app.queuePrompt(0)")
        response = answer.value
        body = response.json()
        if not response.ok or "prompt_id" not in body:
            raise PageError(f"the server refused the prompt (HTTP {response.status}): {json.dumps(body)[:4000]}")
        return body["prompt_id"]

    def events(self, kind: str | None = None) -> list[dict]:
        """Recorded websocket messages since this page load: [{type, t (ms), data}]."""
        events = self.page.evaluate("() => window.__e2e.events")
        return [e for e in events if kind is None or e["type"] == kind]

    def wait_finished(self, prompt_id: str, timeout_ms: int | None = None) -> dict:
        """Wait for the prompt's history entry (written when it ends, however it ends) and return it.

        Polls GET /history/<id> from the page: the end message itself may have come before
        this page load."""
        return self.poll("""async (id) => {
            const r = await window.app.api.fetchApi(`/history/${id}`);
            return r.ok ? (await r.json())[id] ?? null : null;
        }""", prompt_id, what=f"prompt {prompt_id} to finish", timeout_ms=timeout_ms)

    # -- waiting

    def wait_for(self, js: str, arg: Any = None, *, what: str, timeout_ms: int | None = None,
                 polling: int | str = "raf") -> Any:
        """page.wait_for_function with a message that says what was awaited. `js` must be
        synchronous: Playwright takes a returned Promise as true at once (use poll())."""
        start = time.monotonic()
        try:
            handle = self.page.wait_for_function(js, arg=arg, timeout=timeout_ms or self.timeout_ms, polling=polling)
        except Exception as e:
            if type(e).__name__ != "TimeoutError":
                raise
            raise PageError(f"timed out after {time.monotonic() - start:.1f} s waiting for {what}\n"
                            + "\n".join(self.console[-20:])) from None
        return handle.json_value()

    def poll(self, js: str, arg: Any = None, *, what: str, timeout_ms: int | None = None,
             interval_ms: int = 200) -> Any:
        """Evaluate `js` (it may be async) until it returns a truthy value; return that value."""
        deadline = time.monotonic() + (timeout_ms or self.timeout_ms) / 1000
        while True:
            value = self.page.evaluate(js, arg)
            if value:
                return value
            if time.monotonic() > deadline:
                raise PageError(f"timed out waiting for {what}; last answer {value!r}\n" + "\n".join(self.console[-20:]))
            self.page.wait_for_timeout(interval_ms)

    # -- pictures

    def focus_node(self, node_id: int, margin: int = 40) -> None:
        """Bring the node to the front, scroll and zoom the canvas so it sits in the middle at
        scale 1 (smaller where it does not fit)."""
        self.page.evaluate(_FOCUS_JS, [node_id, margin])
        self.page.mouse.move(1, 1)  # no hover highlight or tooltip on the node
        self.next_frames()

    def next_frames(self, count: int = 2) -> None:
        """Let the canvas draw (it redraws on animation frames)."""
        self.page.evaluate("(n) => new Promise((done) => { const f = (k) => k ? requestAnimationFrame(() => f(k - 1)) "
                           ": done(); f(n); })", count)

    def fit_view(self) -> None:
        """Zoom the canvas so every node is in view, clear of the side bar and top menu."""
        self.page.evaluate(_FIT_JS)
        self.page.mouse.move(1, 1)
        self.next_frames()

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def screenshot_graph(self, path: Path, width: int = 2400, height: int = 1500) -> Path:
        """A PNG of the whole graph, in a window made large enough that the canvas draws the
        nodes in full detail (below about 60 % zoom it leaves out widget text)."""
        before = self.page.viewport_size
        self.page.set_viewport_size({"width": width, "height": height})
        try:
            self.wait_for(f"() => window.app.canvas.canvas.getBoundingClientRect().width >= {width - 100}",
                          what="the canvas to follow the window's size")
            self.fit_view()
            return self.screenshot(path)
        finally:
            self.page.set_viewport_size(before)

    def node_rect(self, node_id: int) -> dict:
        return self.page.evaluate(_NODE_RECT_JS, node_id)

    def screenshot_node(self, node_id: int, path: Path, pad: int = 12) -> Path:
        """A PNG of the node (its title bar and a small margin), as the canvas draws it now."""
        self.focus_node(node_id)
        r = self.node_rect(node_id)
        viewport = self.page.viewport_size
        x, y = max(0, r["x"] - pad), max(0, r["y"] - pad)
        clip = {"x": x, "y": y, "width": min(viewport["width"] - x, r["width"] + 2 * pad),
                "height": min(viewport["height"] - y, r["height"] + 2 * pad)}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), clip=clip)
        return path
