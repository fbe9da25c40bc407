// Concept Forge: the live loss chart on Learn Concept, and the text every Concept Forge node reports.
// Fed by the server's `concept_forge.loss` events; after a page reload it redraws from /concept_forge/loss_history.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const TRAINERS = new Set(["ConceptForgeLearnConcept", "ConceptForgeTuningEncoder"]);
const EVENT = "concept_forge.loss";
const SMOOTHING = 0.9; // the same EMA as the loss_plot image (nodes/plot.py)
const COLORS = { raw: "#5a6f99", smooth: "#b197fc", grid: "#444", text: "#ccc" };

function smoothed(values) {
  const out = [];
  let average = 0;
  values.forEach((v, i) => {
    average = SMOOTHING * average + (1 - SMOOTHING) * v;
    out.push(average / (1 - SMOOTHING ** (i + 1)));
  });
  return out;
}

// The lines of `text` that each fit `maxWidth` on `ctx`, broken between words (a narrow node must not cut it off).
function wrapped(ctx, text, maxWidth) {
  const lines = [];
  for (const word of text.split(" ")) {
    const line = lines.length ? `${lines.at(-1)} ${word}` : word;
    if (lines.length && ctx.measureText(line).width <= maxWidth) lines[lines.length - 1] = line;
    else lines.push(word);
  }
  return lines;
}

// Widgets whose 0 means "the default": the label says so, since the number alone reads as a real 0.
const ZERO_MEANS = {
  steps: "steps (0 = method's)",
  learning_rate: "learning_rate (0 = method's)",
  vectors: "vectors (0 = one per token)",
  resolution: "resolution (0 = model's)",
};

class LossChart {
  constructor() {
    this.steps = [];
    this.losses = [];
    this.total = 0;
    this.element = document.createElement("div");
    this.element.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
    this.canvas = document.createElement("canvas");
    this.canvas.className = "concept-forge-loss-chart";
    this.canvas.style.cssText = "width:100%;flex:1 1 auto;min-height:120px;background:#1e1e1e;border-radius:4px;";
    this.caption = document.createElement("div");
    this.caption.style.cssText = `font:11px monospace;color:${COLORS.text};white-space:pre-wrap;`;
    this.element.append(this.canvas, this.caption);
    this.draw();
  }

  replay(history) {
    this.steps = [...history.steps];
    this.losses = [...history.losses];
    this.total = history.total;
    this.draw();
  }

  add(step, loss, total) {
    if (step <= (this.steps.at(-1) ?? 0)) { // a new run
      this.steps = [];
      this.losses = [];
    }
    this.steps.push(step);
    this.losses.push(loss);
    this.total = total;
    this.draw();
  }

  finish(losses) {
    this.steps = losses.map((_, i) => i + 1);
    this.losses = [...losses];
    this.total = losses.length;
    this.draw();
  }

  draw() {
    const canvas = this.canvas;
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, canvas.clientWidth) * ratio;
    const height = Math.max(120, canvas.clientHeight) * ratio;
    canvas.width = width;
    canvas.height = height;
    canvas.dataset.points = String(this.steps.length); // read by the browser test
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    const pad = { left: 48 * ratio, right: 8 * ratio, top: 8 * ratio, bottom: 18 * ratio };
    ctx.strokeStyle = COLORS.grid;
    ctx.strokeRect(pad.left, pad.top, width - pad.left - pad.right, height - pad.top - pad.bottom);
    ctx.fillStyle = COLORS.text;
    ctx.font = `${10 * ratio}px monospace`;
    if (!this.losses.length) {
      const lines = wrapped(ctx, "loss per step appears here while training", width - pad.left - pad.right - 12 * ratio);
      const lineHeight = 14 * ratio;
      lines.forEach((line, i) => ctx.fillText(line, pad.left + 6 * ratio, height / 2 + (i - (lines.length - 1) / 2) * lineHeight));
      return;
    }
    const low = Math.min(...this.losses);
    const high = Math.max(...this.losses);
    const span = high - low || 1;
    const lastStep = Math.max(this.total, this.steps.at(-1));
    const x = (step) => pad.left + (width - pad.left - pad.right) * (step - 1) / Math.max(1, lastStep - 1);
    const y = (v) => pad.top + (height - pad.top - pad.bottom) * (1 - (v - low) / span);
    ctx.fillText(high.toFixed(4), 2 * ratio, pad.top + 8 * ratio);
    ctx.fillText(low.toFixed(4), 2 * ratio, height - pad.bottom);
    ctx.fillText(`step ${this.steps.at(-1)}/${lastStep}`, pad.left, height - 4 * ratio);
    for (const [series, color, lineWidth] of [[this.losses, COLORS.raw, 1], [smoothed(this.losses), COLORS.smooth, 2.5]]) {
      ctx.strokeStyle = color;
      ctx.lineWidth = lineWidth * ratio;
      ctx.beginPath();
      series.forEach((v, i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, x(this.steps[i]), y(v)));
      ctx.stroke();
    }
    const last = this.losses.at(-1);
    this.caption.textContent = `loss ${last.toFixed(4)} · smoothed ${smoothed(this.losses).at(-1).toFixed(4)}`;
  }
}

function chain(object, method, extra) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    extra.apply(this, args);
    return result;
  };
}

let history = null; // the server's curves, fetched once per page load
function fetchHistory() {
  history ??= api.fetchApi("/concept_forge/loss_history").then((r) => (r.ok ? r.json() : {})).catch(() => ({}));
  return history;
}

app.registerExtension({
  name: "ConceptForge.LossChart",

  async setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      app.graph?.getNodeById(Number(detail.node))?.conceptForgeChart?.add(detail.step, detail.loss, detail.total);
    });
  },

  async loadedGraphNode(node) {
    if (!node.conceptForgeChart) return;
    const curves = await fetchHistory();
    const curve = curves[String(node.id)];
    if (curve) node.conceptForgeChart.replay(curve);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("ConceptForge")) return;
    const trainer = TRAINERS.has(nodeData.name);
    chain(nodeType.prototype, "onNodeCreated", function () {
      if (nodeData.name === "ConceptForgeLearnConcept") {
        for (const widget of this.widgets ?? []) widget.label = ZERO_MEANS[widget.name] ?? widget.label;
      }
      if (trainer) {
        this.conceptForgeChart = new LossChart();
        this.addDOMWidget("loss_chart", "concept_forge_chart", this.conceptForgeChart.element, {
          serialize: false,
          getMinHeight: () => 170,
        });
      }
      const report = document.createElement("div");
      report.style.cssText = `font:11px monospace;color:${COLORS.text};white-space:pre-wrap;max-height:220px;overflow:auto;`;
      this.conceptForgeReport = report;
      this.addDOMWidget("report", "concept_forge_report", report, { serialize: false, getMinHeight: () => 20 });
    });
    chain(nodeType.prototype, "onExecuted", function (message) {
      if (message?.loss && this.conceptForgeChart) this.conceptForgeChart.finish(message.loss);
      if (message?.text && this.conceptForgeReport) this.conceptForgeReport.textContent = message.text.join("\n");
    });
  },
});
