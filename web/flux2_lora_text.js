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
        // Display only. `serialize = false` keeps it out of the saved workflow (widgets_values);
        // `options.serialize = false` keeps it out of the prompt that Run sends. Without the
        // latter the text becomes an input of the node, so the next Run sees changed inputs,
        // misses the cache and trains again, and the text lands in the saved prompt metadata.
        widget.serialize = false;
        (widget.options ??= {}).serialize = false;
        const el = widget.element ?? widget.inputEl; // inputEl is the deprecated name
        if (el) {
          el.readOnly = true;
          el.style.opacity = 0.85;
        }
      }
      widget.value = text;
      this.setSize([this.size[0], Math.max(this.size[1], this.computeSize()[1])]);
      app.graph.setDirtyCanvas(true, true);
    };
  },
});
