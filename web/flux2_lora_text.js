// Shows the text the pack's nodes return (dataset summary, resolved options, vRAM estimate,
// saved file) on the node itself after it runs.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODES_WITH_TEXT = new Set(["Flux2LoraDataset", "Flux2LoraConfig", "Flux2VramEstimate", "Flux2SaveLora"]);
const WIDGET = "result";

app.registerExtension({
  name: "comfyui-flux2-lora-trainer.result-text",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODES_WITH_TEXT.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === WIDGET);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false; // display only: not saved in the workflow, not sent to the server
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = 0.85;
        }
      }
      widget.value = text;
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
