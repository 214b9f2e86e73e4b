"""report.html: one self-contained page (figures embedded as PNG data, no script, no network).

Findings come first, ordered by severity; then the curves, the learning rate, per-layer statistics,
first-layer filters, the confusion matrix, augmented training images and, folded away at the end,
the resolved recipe. Every figure has an anchor `#plot-<name>` (curves, learning-rate, ...).
Every string that came from the user (class names, paths, recipe values) goes through `escape`.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dragontrainer.monitor.diagnose import Finding, RunRecords, diagnose
from dragontrainer.optim.optimizers import base_lr
from dragontrainer.run import RunDir, atomic_write_json, atomic_write_text

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.meta { color: #666; } .finding { border-left: 5px solid; padding: 0.4em 0.8em; margin: 0.6em 0; background: #fafafa; }
.error { border-color: #c62828; } .warning { border-color: #ef6c00; } .info { border-color: #1565c0; }
.sev { font-weight: bold; text-transform: uppercase; font-size: 0.8em; margin-right: 0.5em; }
.key { font-family: monospace; color: #555; } .advice { margin-top: 0.3em; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #555; max-width: 560px; } img { max-width: 100%; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #eee; text-align: left; }
pre { background: #f5f5f5; padding: 0.8em; overflow-x: auto; } details { margin: 0.3em 0; }
details#recipe { margin-top: 2em; border-top: 1px solid #ddd; padding-top: 0.6em; }
details#recipe > summary { font-size: 1.2em; font-weight: bold; cursor: pointer; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


# a finding's `plot` -> the figure that shows its evidence (the anchor its link jumps to)
PLOTS = {"loss": "curves", "accuracy": "curves", "lr": "learning-rate", "activations": "activation-heatmap",
         "grad": "gradient-heatmap", "dead": "dead-units", "update": "update-ratios", "confusion": "confusion",
         "inputs": "augmented", "suspects": "suspects"}  # fmt: skip


def image_tag(data: bytes | None, alt: str, caption: str, name: str = "") -> str:
    """A figure; `name` gives it the anchor `#plot-<name>` that findings and other pages link to."""
    if data is None:
        return ""
    encoded = base64.b64encode(data).decode("ascii")
    anchor = f' id="plot-{escape(name)}"' if name else ""
    return (
        f'<figure{anchor}><img src="data:image/png;base64,{encoded}" alt="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def checkpoint_shapes(run_dir: RunDir) -> dict[str, list[int]]:
    """Tensor name -> shape of the best (else last) weights, read from the header only."""
    from safetensors import safe_open

    for folder in ("best", "last"):
        file = run_dir.checkpoints / folder / "model.safetensors"
        if file.exists():
            with safe_open(str(file), framework="np") as handle:
                return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    return {}


def evidence_link(finding: Finding, shown: set[str]) -> str:
    """A link to the figure with the finding's evidence, naming the step and layer to look at."""
    anchor = PLOTS.get(finding.plot or "")
    if anchor is None or anchor not in shown:
        return ""
    where = [f"{k} {finding.evidence[k]}" for k in ("step", "epoch", "layer") if finding.evidence.get(k) is not None]
    return f' <a href="#plot-{anchor}">see the evidence{": " + escape(", ".join(where)) if where else ""}</a>'


def finding_block(finding: Finding, shown: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    evidence = escape(json.dumps(finding.evidence, default=str)[:2000])
    if finding.because:  # a consequence, shown beneath the finding that explains it
        return (f'<div class="finding {finding.severity}" style="margin-left:2em">…which is why '
                f'<span class="key">{escape(finding.key)}</span>: {escape(finding.verdict)}'
                f"{evidence_link(finding, shown)}</div>")  # fmt: skip
    tried = " ".join(finding.overrides)
    return (
        f'<div class="finding {finding.severity}"><span class="sev">{finding.severity}</span>'
        f'<span class="key">{escape(finding.key)}</span><div>{escape(finding.verdict)}{evidence_link(finding, shown)}'
        f'</div><div class="advice"><b>Try:</b> <code>{escape(tried)}</code> {escape(finding.advice)}</div>'
        f"<details><summary>evidence</summary><code>{evidence}</code></details></div>"
    )


def summary_table(run: RunRecords, result: dict[str, Any] | None) -> str:
    rows = [("data", f"{run.recipe.data.source} {run.recipe.data.path or ''}".strip()),
            ("classes", f"{run.num_classes}: {', '.join(map(str, run.data['classes'][:20]))}"
             + (" …" if run.num_classes > 20 else "")),
            ("images", f"{run.data['num_train']} train / {run.data['num_val']} val / {run.data['num_test']} test"),
            ("model", f"{run.recipe.model.name}, {run.recipe.model.activation}, norm {run.recipe.model.norm}, "
                      f"init {run.recipe.model.init}"),
            ("optimiser", f"{run.recipe.optim.name} lr {run.recipe.optim.lr} ({base_lr(run.recipe.optim):g}), "
                          f"schedule {run.recipe.schedule.name}")]  # fmt: skip
    if run.val:
        # the best checkpoint is chosen by train.early_stopping.monitor, as the CLI reports it
        by_epoch = {r["epoch"]: r for r in run.val}
        best = by_epoch.get((result or {}).get("best_epoch"), max(run.val, key=lambda r: r["accuracy"]))
        monitor = run.recipe.train.early_stopping.monitor
        rows.append(("validation", f"final {run.val[-1]['accuracy']:.2%}; best checkpoint (by {monitor}): epoch "
                                   f"{best['epoch']} of {run.val[-1]['epoch']}, {best['accuracy']:.2%}"))  # fmt: skip
    if result and result.get("test_accuracy") is not None:
        rows.append(("test", f"{result['test_accuracy']:.2%} (best checkpoint)"))
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows) + "</table>"


def safe(draw: Callable[[], bytes | None]) -> bytes | None:
    """A figure that cannot be drawn (odd shapes, missing series) is left out, never fatal."""
    try:
        return draw()
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def first_layer_weight(run_dir: RunDir, records: RunRecords) -> np.ndarray | None:
    from safetensors.numpy import load_file

    for folder in ("best", "last"):
        file = run_dir.checkpoints / folder / "model.safetensors"
        if file.exists() and records.layers:
            tensors = load_file(file)
            first = next(iter(records.layers[-1]["params"]))
            for key in (f"{first}.weight", first):
                if key in tensors:
                    return tensors[key].astype(np.float32)
    return None


def augmented_samples(run_dir: RunDir, classes: list[str]) -> bytes | None:
    file = run_dir.file("augment_samples.safetensors")
    if not file.exists():
        return None
    from safetensors.numpy import load_file

    from dragontrainer.report import plots

    tensors = load_file(file)
    labels = [classes[int(i)] for i in tensors["labels"]]
    return plots.image_grid(tensors["images"], labels, "augmented training images (as the network gets them)")


def suspects_gallery(run_dir: RunDir, classes: list[str]) -> bytes | None:
    """The training images whose label the model most confidently disagrees with (suspect_labels.csv)."""
    file = run_dir.file("suspects.safetensors")
    if not file.exists():
        return None
    from safetensors.numpy import load_file

    from dragontrainer.report import plots

    tensors = load_file(file)
    if not len(tensors["images"]):
        return None
    labels = [
        f"{classes[int(g)]}→{classes[int(p)]}" for g, p in zip(tensors["given"], tensors["predicted"], strict=True)
    ]
    return plots.image_grid(tensors["images"], labels, "suspect labels: given → predicted")


def render(run_dir: RunDir, records: RunRecords, findings: list[Finding]) -> str:
    from dragontrainer.report import plots

    result_file = run_dir.file("result.json")
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.exists() else None
    epochs = records.kind("epoch")
    weight = first_layer_weight(run_dir, records)
    activation_kinds = plots.layer_kinds(records, "activations")
    param_kinds = plots.layer_kinds(records, "params", checkpoint_shapes(run_dir))
    blank = (" Hatched cells have no colour: 0 on the log scale — a dead layer, its {what} all zero (the row "
             "says from when) — or not measured.")  # fmt: skip
    figures = {
        "Training": [
            image_tag(safe(lambda: plots.curves(records)), "loss and accuracy curves",
                      "Loss per step and per epoch; accuracy train vs validation with the gap shaded. A big gap: "
                      "overfitting; no gap at low accuracy: underfitting.", "curves"),
            image_tag(safe(lambda: plots.learning_rate(records)), "learning rate", "Learning rate at every step.",
                      "learning-rate"),
        ],
        "Inside the network": [
            image_tag(safe(lambda: plots.layer_heatmap(records, "activations", lambda a: a["std"],
                                                       "activation std (probe batch)", log=True,
                                                       kinds=activation_kinds)),
                      "activation std heat map", "Activation spread per layer over time: collapsing to dark means "
                      "vanishing signal, bright bands exploding." + blank.format(what="outputs"),
                      "activation-heatmap"),
            image_tag(safe(lambda: plots.layer_heatmap(
                records, "params", lambda p: p["grad_norm"] / p["weight_norm"] if p["weight_norm"] else None,
                "gradient / weight norm", log=True, cmap="magma", kinds=param_kinds)),
                "gradient heat map", "Gradient size relative to the weights per layer: a dark first layer means "
                "vanishing gradients." + blank.format(what="gradients"), "gradient-heatmap"),
            image_tag(safe(lambda: plots.dead_fractions(records)), "dead units",
                      "Fraction of channels that output ≤ 0 for every probe image (dead ReLUs cannot recover).",
                      "dead-units"),
            image_tag(safe(lambda: plots.update_ratios(records, param_kinds)), "update ratios",
                      "Update/weight ratio per layer; about 1e-3 is healthy (CS231n): far below, the learning rate "
                      "is too low; far above, too high.", "update-ratios"),
            image_tag(safe(lambda: plots.filters(weight, records.data["image_shape"])) if weight is not None else None,
                      "first-layer filters", "First-layer filters of the best checkpoint: smooth, varied patterns "
                      "are healthy; noise means too little training or too high a learning rate.", "filters"),
        ],
        "Predictions and data": [
            image_tag(safe(lambda: plots.confusion(epochs[-1]["confusion"], records.data["classes"]))
                      if epochs else None, "confusion matrix", f"Validation, epoch {epochs[-1]['epoch']}."
                      if epochs else "", "confusion"),
            image_tag(safe(lambda: augmented_samples(run_dir, records.data["classes"])), "augmented images",
                      "A batch after augmentation, before preprocessing.", "augmented"),
            image_tag(safe(lambda: suspects_gallery(run_dir, records.data["classes"])), "suspect labels",
                      "Training images whose given label the model confidently disagrees with (out-of-sample "
                      "predictions); all of them are in suspect_labels.csv.", "suspects"),
        ],
    }  # fmt: skip
    from dragontrainer.monitor.lr_finder import report_section

    found_png, found_caption = report_section(run_dir.path)  # runs trained with optim.lr=find
    if found_png is not None:
        figures["Learning-rate range test"] = [image_tag(found_png, "learning-rate range test", found_caption)]
    counts = {s: sum(f.severity == s for f in findings) for s in ("error", "warning", "info")}
    headline = (
        "No problems found." if not counts["error"] and not counts["warning"]
        else f"{counts['error']} error(s), {counts['warning']} warning(s)."
    )  # fmt: skip
    shown = {anchor for tags in figures.values() for tag in tags for anchor in PLOTS.values()
             if f'id="plot-{anchor}"' in tag}  # fmt: skip
    sections = "".join(f"<h2>{escape(title)}</h2>" + "".join(tags) for title, tags in figures.items() if any(tags))
    recipe_text = run_dir.recipe_path.read_text(encoding="utf-8") if run_dir.recipe_path.exists() else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>dragon report: {escape(run_dir.path.name)}</title>
<style>{STYLE}</style></head><body>
<h1>dragon report</h1><div class="meta">{escape(run_dir.path)}</div>
<h2>What the dragon tells you</h2><p>{escape(headline)}</p>
{"".join(finding_block(f, shown) for f in findings)}
<h2>Summary</h2>{summary_table(records, result)}
{per_class_table(result)}
{sections}
<details id="recipe"><summary>Recipe (recipe.yaml: every knob of this run)</summary><pre>{escape(recipe_text)}</pre>
</details>
</body></html>
"""


def per_class_table(result: dict[str, Any] | None) -> str:
    """Precision, recall and F1 per class of the best weights, with the balanced accuracy: what counts
    when the classes are imbalanced."""
    rows = (result or {}).get("per_class")
    if not rows:
        return ""

    def cell(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    body = "".join(
        f"<tr><td>{escape(str(r['class']))}</td><td>{r['support']}</td><td>{cell(r['precision'])}</td>"
        f"<td>{cell(r['recall'])}</td><td>{cell(r['f1'])}</td></tr>"
        for r in rows
    )
    balanced = (result or {}).get("best_val_balanced_accuracy")
    note = f"Balanced accuracy (validation, best epoch): {balanced:.2%}. " if balanced is not None else ""
    split = escape(str(result.get("per_class_split") or "val")) if result else "val"
    return (
        f"<h2>Per class</h2><p>{note}The best weights on the {split} split.</p><table><tr><th>class</th>"
        f"<th>support</th><th>precision</th><th>recall</th><th>F1</th></tr>{body}</table>"
    )


def write_report(path: str | Path) -> tuple[Path, list[Finding]]:
    """Diagnose the run folder, write findings.json and report.html (atomically); return the page's path."""
    run_dir = RunDir.open(path)
    records = RunRecords.load(run_dir.path)
    findings = diagnose(records)
    atomic_write_json(run_dir.file("findings.json"), [f.to_dict() for f in findings])
    sync_result_findings(run_dir, findings)
    page = run_dir.file("report.html")
    atomic_write_text(page, render(run_dir, records, findings))
    return page, findings


def sync_result_findings(run_dir: RunDir, findings: list[Finding]) -> None:
    """result.json carries the same findings as findings.json (one diagnosis, two places to read it)."""
    result_file = run_dir.file("result.json")
    if not result_file.exists():
        return
    result = json.loads(result_file.read_text(encoding="utf-8"))
    result["findings"] = [f.to_dict() for f in findings]
    atomic_write_json(result_file, result)
