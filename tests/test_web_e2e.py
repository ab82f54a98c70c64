"""The pack's front end in headless Chromium, on a real ComfyUI with its real front end.

A user's path through the train-and-preview template, with the tiny CPU models: open it
from the template browser, swap in the test loaders, make the run small, see the vRAM
bar's number, Run, reload the page mid-run, and see the loss chart keep the steps from
before the reload and draw every step up to the last. PNGs of the Train LoRA and vRAM
Estimate nodes are kept under pytest's tmp dir, and copied to ARTIFACTS_DIR when set.

Needs Playwright and a Chromium (tests/browser.py says where they come from) besides
ComfyUI (COMFYUI_DIR or COMFYUI_ARCHIVE); it skips, saying which is missing, without them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from browser import chromium, comfy_page, skip_reason  # noqa: F401  (fixtures)
from comfyui_harness import PACK_FOLDER

SKIP = skip_reason()
pytestmark = [pytest.mark.comfyui, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

TEMPLATE = "train_and_preview"
EXAMPLE = Path(__file__).resolve().parents[1] / "example_workflows" / f"{TEMPLATE}.json"
# About 0.2 s a step on 2 CPU cores, and the run all but stops while the page reloads (the
# server is busy serving it): most steps come after the reload.
STEPS = 30
RELOAD_AT = 3  # the page reloads once the chart has this many steps

# The chart's data (web/flux2_lora_chart.js keeps it on the node as `flux2LossChart`).
CHART_STATE_JS = """(id) => {
  const chart = window.app.graph.getNodeById(id)?.flux2LossChart;
  if (!chart) return null;
  const run = chart.run;
  const images = (run.previews?.images ?? []).map((p) => chart.image(p.view));
  return {loading: chart.loading, historyFor: chart.historyFor, state: run.state, step: run.step,
          total: run.total, steps: [...run.steps], loss: [...run.loss], smoothed: [...run.smoothed],
          validation: {steps: [...run.validation.steps], losses: [...run.validation.losses], best: run.validation.best},
          previewStep: run.previews?.step ?? null, previewSizes: images.map((i) => i && i.complete ? i.naturalWidth : 0),
          previewRects: (chart.previewRects ?? []).length};
}"""

# The status line the chart draws (statusLines of web/chart_data.js on the chart's data).
STATUS_JS = """async (id) => {
  const {statusLines} = await import('/extensions/comfyui-flux2-lora-trainer/chart_data.js');
  return statusLines(window.app.graph.getNodeById(id).flux2LossChart.run.summary());
}"""

# The bar's latest answer (web/flux2_lora_vram.js keeps the bar on the node as `flux2VramBar`):
# null until the bar has sent the request that the graph's current widgets make and the
# answer it shows equals the route's answer to that request.
VRAM_STATE_JS = """async (id) => {
  const bar = window.app.graph.getNodeById(id)?.flux2VramBar;
  if (!bar || bar.loading || !bar.estimate) return null;
  const {buildEstimateRequest} = await import('/extensions/comfyui-flux2-lora-trainer/vram_data.js');
  const key = JSON.stringify(buildEstimateRequest(bar.node));
  if (bar.answeredKey !== key) return null;
  const res = await window.app.api.fetchApi('/flux2_lora/estimate', {method: 'POST', body: key,
                                            headers: {'Content-Type': 'application/json'}});
  const answer = await res.json();
  if (bar.answeredKey !== key || bar.loading || bar.estimate.total !== answer.total) return null;
  return {request: JSON.parse(key), estimate: bar.estimate, answer};
}"""

# What the canvas shows in the chart's plot (node at scale 1, see ComfyPage.focus_node):
# the plot lines are the theme's accent blue, the only strongly blue pixels in the node.
CHART_PIXELS_JS = """(id) => {
  const app = window.app, node = app.graph.getNodeById(id);
  const canvas = app.canvas.canvas, ds = app.canvas.ds;
  const ratio = canvas.width / canvas.getBoundingClientRect().width;
  const r = node.flux2LossChart.plotRect;  // where the chart drew its plot, in node coordinates
  const toPx = ([x, y]) => ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]).map((v) => Math.round(v * ratio));
  const [x0, y0] = toPx([r.x, r.y]);
  const [x1, y1] = toPx([r.x + r.w, r.y + r.h]);
  const data = canvas.getContext('2d').getImageData(x0, y0, x1 - x0, y1 - y0).data;
  const w = x1 - x0, h = y1 - y0, colours = new Set();
  let blue = 0, right = -1, left = w;
  for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
    const i = 4 * (y * w + x), r = data[i], g = data[i + 1], b = data[i + 2];
    colours.add((r << 16) | (g << 8) | b);
    if (b > 150 && b - r > 70) { blue++; right = Math.max(right, x); left = Math.min(left, x); }
  }
  return {width: w, height: h, colours: colours.size, blue, blueLeft: left, blueRight: right,
          png: canvas.toDataURL('image/png').length};
}"""


@pytest.fixture
def robots(comfy_dataset) -> str:
    return comfy_dataset


def make_tiny(page, dataset: str) -> dict[str, int]:
    """Edit the loaded template in the page for the tiny CPU models and a short run;
    returns the ids of the pack's nodes."""
    ids = {t: page.node_id(t) for t in ("CLIPLoader", "VAELoader", "Flux2LoraDataset", "Flux2LoraConfig",
                                         "Flux2TrainLora", "Flux2VramEstimate", "Flux2Scheduler",
                                         "EmptyFlux2LatentImage")}
    # ComfyUI's loaders cannot load tiny files: the test nodes build the same classes, tiny.
    page.replace_node(ids.pop("CLIPLoader"), "Flux2TestTinyCLIP", {"type": "klein"})
    page.replace_node(ids.pop("VAELoader"), "Flux2TestTinyVAE")
    page.set_widgets(ids["Flux2LoraDataset"], {"folder": dataset, "resolution": 128, "trigger_word": "r0b0t"})
    # A seed no other test uses: ComfyUI would otherwise answer from its cache.
    # The template's preview_every (200) stays: previews at the start and at the last step, small.
    page.set_widgets(ids["Flux2LoraConfig"], {"steps": STEPS, "rank": 4, "seed": 4242, "save_every": 6,
                                              "advanced": "preview_resolution: 64\npreview_steps: 3"})
    page.set_widgets(ids.pop("Flux2Scheduler"), {"steps": 2, "width": 64, "height": 64})
    page.set_widgets(ids.pop("EmptyFlux2LatentImage"), {"width": 64, "height": 64})
    return ids


def keep(path: Path) -> Path:
    """Copy an artifact to ARTIFACTS_DIR when that is set; returns where it is kept."""
    if folder := os.environ.get("ARTIFACTS_DIR"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy(path, Path(folder) / path.name))
    return path


@pytest.mark.failure_case("page reloaded mid-run")
def test_template_run_with_the_loss_chart_across_a_page_reload(comfy_page, robots, tmp_path, capsys):
    page, clock = comfy_page, Clock()
    page.load_template(PACK_FOLDER, TEMPLATE)
    expected = json.loads(EXAMPLE.read_text())
    assert sorted(n["type"] for n in page.graph_nodes()) == sorted(n["type"] for n in expected["nodes"])
    # The pack's widgets size their nodes; the template leaves them room.
    assert not page.overlaps(), f"nodes overlap in the loaded template: {page.overlaps()}"
    ids = make_tiny(page, robots)
    train, vram = ids["Flux2TrainLora"], ids["Flux2VramEstimate"]
    clock.lap("template loaded and edited")

    # The vRAM bar has the route's estimate for the edited widgets before anything runs.
    bar = page.poll(VRAM_STATE_JS, vram, what="the vRAM bar's estimate for the edited graph")
    assert bar["request"]["dataset"]["resolution"] == 128 and bar["request"]["config"]["steps"] == STEPS
    assert bar["request"]["unet_name"] == expected_widget(expected, "UNETLoader", 0)
    assert bar["estimate"]["total"] > 0 and "error" not in bar["estimate"]
    assert sum(s["bytes"] for s in bar["estimate"]["segments"]) == bar["answer"]["total"]
    vram_shot = keep(page.screenshot_node(vram, tmp_path / "vram_estimate_node.png"))
    assert page.page.evaluate(CHART_STATE_JS, train) is not None, "the Train LoRA node has no flux2LossChart"
    clock.lap("vRAM estimate shown")

    page.wait_saved()  # the edits are what the reload below restores
    prompt_id = page.queue()
    page.wait_for(f"""() => {{
        const run = window.app.graph.getNodeById({train}).flux2LossChart.run;
        return run.state === 'training' && run.steps.length >= {RELOAD_AT}; }}""",
                  what=f"{RELOAD_AT} steps on the chart")
    clock.lap(f"queued, {RELOAD_AT} steps on the chart")
    page.reload()
    # The page restored the edited graph (same node ids) and the chart took the server's history.
    page.wait_for(f"""() => window.app.graph.nodes.some((n) => n.type === 'Flux2TestTinyCLIP')
                             && window.app.graph.getNodeById({train})?.type === 'Flux2TrainLora'""",
                  what="the page to restore the edited graph after the reload")
    page.wait_for(f"""() => {{ const c = window.app.graph.getNodeById({train})?.flux2LossChart;
                               return c && c.historyFor === '{train}' && !c.loading; }}""",
                  what="the chart's history request after the reload")
    from_history = page.page.evaluate(CHART_STATE_JS, train)["steps"]
    assert from_history == list(range(1, len(from_history) + 1)) and len(from_history) >= RELOAD_AT, from_history
    clock.lap(f"reloaded, steps 1-{len(from_history)} from the history")

    entry = page.wait_finished(prompt_id, timeout_ms=120_000)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    page.wait_for(f"() => {{ const r = window.app.graph.getNodeById({train}).flux2LossChart.run;"
                  f" return r.state === 'finished' && r.step === {STEPS}; }}", what="the chart to show the finished run")
    chart = page.page.evaluate(CHART_STATE_JS, train)
    live = [e["data"]["step"] for e in page.events("flux2_lora.progress") if e["data"].get("kind") == "step"]
    clock.lap(f"finished, {len(live)} steps came live after the reload")
    # Every step once, in order: the history, then the websocket's steps (overlap dropped).
    assert chart["steps"] == list(range(1, STEPS + 1)) and chart["total"] == STEPS
    assert live and max(live) == STEPS, "no step came live after the reload: the run ended first; raise STEPS"
    assert all(x > 0 for x in chart["loss"]) and all(x > 0 for x in chart["smoothed"])
    history = page.page.evaluate(f"async () => (await (await window.app.api.fetchApi("
                                 f"`/flux2_lora/history/{train}?workflow=${{window.app.graph.id}}`)).json()).events")
    assert [e["loss"] for e in history if e["kind"] == "step"] == chart["loss"]
    status = page.page.evaluate(STATUS_JS, train)
    assert status["head"].startswith("Finished") and f"step {STEPS}/{STEPS}" in status["head"], status
    # The validation loss at the start and the end, and the last previews, fetched and drawn under the plot.
    assert chart["validation"]["steps"] == [0, STEPS] and chart["validation"]["best"]["step"] in (0, STEPS)
    assert "val " in status["detail"], status
    page.wait_for(f"""() => {{ const c = window.app.graph.getNodeById({train}).flux2LossChart;
                               return (c.previewRects ?? []).length === 2
                                      && c.run.previews.images.every((p) => c.image(p.view).naturalWidth === 64); }}""",
                  what="the last previews drawn on the node")
    chart = page.page.evaluate(CHART_STATE_JS, train)
    assert chart["previewStep"] == STEPS and chart["previewSizes"] == [64, 64], chart
    previews = [e["data"] for e in page.events("flux2_lora.progress") if e["data"].get("kind") == "preview"]
    assert [p["step"] for p in previews][-1] == STEPS

    shot = keep(page.screenshot_node(train, tmp_path / "train_lora_node.png"))
    pixels = page.page.evaluate(CHART_PIXELS_JS, train)
    assert pixels["colours"] > 20 and pixels["blue"] > 150, f"the chart looks blank: {pixels}"
    # The x axis ends at the last step: the line reaches the plot's right edge.
    assert pixels["blueRight"] >= pixels["width"] - 4, f"the line stops short of step {STEPS}: {pixels}"
    graph_shot = keep(page.screenshot_graph(tmp_path / "train_and_preview_graph.png"))
    clock.lap("checked the canvas, screenshots")
    print(clock.report())
    with capsys.disabled():  # shown in a passing run too
        print(f"\nscreenshots: Train LoRA node {shot}, vRAM Estimate node {vram_shot}, whole graph {graph_shot}")


# The Train LoRA node moved into a subgraph as a user does it: selected, then "Convert Selection to
# Subgraph". Returns the subgraph node's id and the Train LoRA node's id inside it.
TO_SUBGRAPH_JS = """async (id) => {
  const app = window.app, node = app.graph.getNodeById(id);
  app.canvas.deselectAll();
  app.canvas.select(node);
  await app.extensionManager.command.execute('Comfy.Graph.ConvertToSubgraph');
  const placed = app.graph.nodes.find((n) => n.subgraph?.nodes.some((inner) => inner.type === 'Flux2TrainLora'));
  return placed ? [placed.id, placed.subgraph.nodes.find((inner) => inner.type === 'Flux2TrainLora').id] : null;
}"""

# The chart of the Train LoRA node inside the subgraph that node `outer` places.
INNER_CHART_JS = """([outer, inner]) => window.app.graph.getNodeById(outer).subgraph.getNodeById(inner).flux2LossChart"""


def test_a_train_node_inside_a_subgraph_gets_its_run_live_and_from_the_history(comfy_page, robots):
    page = comfy_page
    page.load_template(PACK_FOLDER, TEMPLATE)
    ids = make_tiny(page, robots)
    page.set_widgets(ids["Flux2LoraConfig"], {"steps": 3, "seed": 4343, "preview_every": 0, "advanced": ""})
    placed = page.page.evaluate(TO_SUBGRAPH_JS, ids["Flux2TrainLora"])
    assert placed is not None, "the Train LoRA node did not move into a subgraph"
    execution_id = f"{placed[0]}:{placed[1]}"
    chart = f"({INNER_CHART_JS})({json.dumps(placed)})"
    prompt_id = page.queue()
    entry = page.wait_finished(prompt_id, timeout_ms=120_000)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    sent = [e["data"] for e in page.events("flux2_lora.progress")]
    assert {e["node"] for e in sent} == {execution_id}
    workflow = page.page.evaluate("() => window.app.graph.id")
    assert {e["workflow"] for e in sent} == {workflow}, "the events name the workflow that ran"
    # Live: every step reached the node inside the subgraph.
    page.wait_for(f"() => {{ const r = {chart}.run; return r.state === 'finished' && r.steps.length === 3; }}",
                  what="the chart inside the subgraph to show the finished run")
    # From the history, as after a page reload: asked for under the execution id and this workflow.
    page.page.evaluate(f"() => {chart}.loadHistory(true)")
    page.wait_for(f"() => {{ const c = {chart}; return !c.loading && c.historyFor === '{execution_id}'"
                  " && c.run.state === 'finished' && c.run.steps.join() === '1,2,3'; }",
                  what="the chart inside the subgraph to rebuild from the history")
    # Another workflow's node of the same id does not show this run.
    assert page.page.evaluate(f"() => {chart}.shows({{node: '{execution_id}', workflow: 'another'}})") is False
    other = page.page.evaluate(f"async () => (await (await window.app.api.fetchApi("
                               f"'/flux2_lora/history/{execution_id}?workflow=another')).json()).events")
    assert other == []


class Clock:
    """Seconds spent in each phase, printed at the end."""

    def __init__(self):
        self.start = self.last = time.monotonic()
        self.laps: list[tuple[str, float]] = []

    def lap(self, what: str) -> None:
        now = time.monotonic()
        self.laps.append((what, now - self.last))
        self.last = now

    def report(self) -> str:
        return "\n".join(f"{seconds:6.1f} s  {what}" for what, seconds in self.laps) + \
            f"\n{time.monotonic() - self.start:6.1f} s  in all"


def expected_widget(workflow: dict, node_type: str, index: int):
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type]
    return node["widgets_values"][index]
