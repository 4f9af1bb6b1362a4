"""The release gate: a default run that misses the figures the docs state fails, and is not registered.

The documented figures live in one place, `docs/results/training/documented.json` (written from a
registered model by `python -m training document --model-tag <tag>`); docs/training.md's gate table is
generated from it and checked against it by tests/test_training_gates.py. Each model's entry, under its
kind in training/tasks.py, holds:

- `figures`: the fp32 test accuracy (text: also out-of-domain) and int8/fp32 agreement the docs report;
  a run fails when it falls more than `tolerance` below one of them;
- `int8_max_drop`: the claim about int8 ("at most one point of test accuracy lost"); a run fails above it;
- `recipe` and `data_counts`: what the documented run trained on. Only a run with the same recipe and the
  same data is gated: a user's own data or flags have no documented figure, and the log says so. Examples
  added with `--extra-data` (`ADDED_TO_TRAINING`) leave the held-out sets as they are, so such a run is gated
  like the one without them.

Fields in `NOT_RECIPE` say where a run is stored, shown or computed, not what it learns; a run that differs
from the documented one only there is still the documented run (the tolerance covers what the hardware
changes in the arithmetic).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from servable.artifact import ModelManifest
from training.tasks import for_task

DOCUMENTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "training" / "documented.json"
# calibrate / abstain_coverage: a temperature fitted after training divides the logits, so no gated
# figure (argmax accuracy, int8/fp32 agreement) moves with them
# threshold_sample / report_json: a report beside the run; the model and its argmax answers stay the same
NOT_RECIPE = ("name", "version", "runs_dir", "register_model", "progress", "device", "amp", "num_threads",
              "calibrate", "abstain_coverage", "threshold_sample", "report_json")  # fmt: skip
# gated figure -> how the log, the docs and the model card name it
FIGURES = {
    "test_accuracy": "fp32 test accuracy",
    "out_of_domain_accuracy": "fp32 out-of-domain accuracy",
    "int8_agreement": "int8/fp32 agreement on the test set",
}
NOT_GATED = "no documented figure for this configuration; not gated"
# --extra-data adds examples to the training split only: the held-out sets, and so the documented figures, are
# the bundled data's, and a retrain on labelled feedback is held to them like any run (provenance `counts` stay
# the bundled split's; the added examples are in `extra_data`)
ADDED_TO_TRAINING = ("extra_data",)


class GateFailed(RuntimeError):
    """A default run missed a documented figure."""


def load_documented(path: Path | None = None) -> dict[str, Any]:
    """kind -> documented entry; empty when the file is absent (an installed copy without the docs)."""
    path = path or DOCUMENTED
    return json.loads(path.read_text())["models"] if path.is_file() else {}


def recipe(training_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in training_config.items() if k not in NOT_RECIPE + ADDED_TO_TRAINING}


def measured(metrics: dict[str, Any]) -> dict[str, float]:
    """The gated figures of a run's metrics (those it has)."""
    test = metrics["test"]
    out = {"test_accuracy": test["fp32"]["accuracy"]}
    if "out_of_domain" in test["fp32"]:
        out["out_of_domain_accuracy"] = test["fp32"]["out_of_domain"]["accuracy"]
    if "int8" in test:
        out["int8_accuracy_drop"] = test["fp32"]["accuracy"] - test["int8"]["accuracy"]
    if metrics.get("agreement_int8_fp32") is not None:
        out["int8_agreement"] = metrics["agreement_int8_fp32"]
    return out


def check(manifest: ModelManifest, documented: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gate's verdict for a run, with the lines the log and the model card print (`metrics.gate`)."""
    gate = _verdict(manifest, load_documented() if documented is None else documented)
    return gate | {"lines": describe(gate)}


def _verdict(manifest: ModelManifest, documented: dict[str, Any]) -> dict[str, Any]:
    kind = for_task(manifest.task).kind
    entry = documented.get(kind)
    run = measured(manifest.metrics)
    if entry is None:
        return {"gated": False, "reason": f"{NOT_GATED} (no documented {kind} run)", "measured": run}
    ours, theirs = recipe(manifest.training_config), entry["recipe"]
    differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k, "<absent>") != theirs.get(k, "<absent>"))
    if differ:
        reason = f"{NOT_GATED} (differs from the documented run {entry['run']} in: {', '.join(differ)})"
        return {"gated": False, "reason": reason, "measured": run}
    counts = manifest.provenance.get("counts")
    if entry.get("data_counts") is not None and counts != entry["data_counts"]:
        reason = f"{NOT_GATED} (data counts {counts} differ from the documented run's {entry['data_counts']})"
        return {"gated": False, "reason": reason, "measured": run}
    tol, extra = entry["tolerance"], manifest.provenance.get("extra_data")
    checks = []
    for name, value in entry["figures"].items():
        got = run.get(name)
        checks.append({"figure": name, "documented": value, "bound": round(value - tol, 6), "compare": ">=",
                       "measured": got, "passed": got is not None and got >= value - tol - 1e-12})  # fmt: skip
    drop, claim = run.get("int8_accuracy_drop"), entry["int8_max_drop"]
    checks.append({"figure": "int8_accuracy_drop", "documented": claim, "bound": claim, "compare": "<=",
                   "measured": drop, "passed": drop is not None and drop <= claim + 1e-12})  # fmt: skip
    return {"gated": True, "documented_run": entry["run"], "tolerance": tol, "checks": checks,
            "passed": all(c["passed"] for c in checks),
            **({"extra_data_added": extra["added"]} if extra else {})}  # fmt: skip


def describe(gate: dict[str, Any]) -> list[str]:
    """One line per check (or why there was none), as the training log and the model card print them."""
    if not gate["gated"]:
        drop = gate["measured"].get("int8_accuracy_drop")
        int8 = f"int8 loses {100 * drop:.2f} points of test accuracy; " if drop is not None else ""
        return [f"gate: {int8}{gate['reason']}"]
    lines = []
    if "extra_data_added" in gate:
        lines.append(f"gate: {gate['extra_data_added']} extra example(s) added to training (--extra-data); "
                     "held-out sets the documented run's")  # fmt: skip
    for c in gate["checks"]:
        if c["figure"] == "int8_accuracy_drop":
            got = "not measured" if c["measured"] is None else f"{100 * c['measured']:.2f} points"
            need = f"documented claim: at most {100 * c['bound']:.1f} point(s)"
        else:
            got = "not measured" if c["measured"] is None else f"{c['measured']:.4f}"
            need = f"documented {c['documented']:.4f} - {100 * gate['tolerance']:.1f} points = {c['bound']:.4f}"
        label = FIGURES.get(c["figure"], "int8 accuracy drop against fp32")
        lines.append(f"gate: {label} {got} ({need}): {'pass' if c['passed'] else 'FAIL'}")
    return lines


def failure_message(gate: dict[str, Any]) -> str:
    failed = [line for line in describe(gate) if line.endswith("FAIL")]
    return (f"the default run missed the figures docs/training.md documents for {gate['documented_run']} "
            f"(docs/results/training/documented.json):\n  " + "\n  ".join(failed))  # fmt: skip


def markdown_table(documented: dict[str, Any]) -> str:
    """docs/training.md's gate table, generated from the documented figures (the test compares the two)."""
    lines = ["| model (documented run, machine) | figure | documented | the default run fails |", "|---|---|---:|---|"]
    for kind in sorted(documented):
        e = documented[kind]
        model = f"{kind}: `{e['run']}`, {e['machine']}"
        for fig, value in e["figures"].items():
            lines.append(f"| {model} | {FIGURES[fig]} | {value:.4f} | below {value - e['tolerance']:.4f} |")
            model = kind
        drop = 100 * e["int8_max_drop"]
        lines.append(
            f"| {kind} | int8 accuracy drop against fp32 | claim: at most {drop:.1f} point | above {drop:.1f} point |"
        )
    return "\n".join(lines) + "\n"


def document(manifest: ModelManifest, tag: str, machine: str, path: Path | None = None) -> dict[str, Any]:
    """Make a registered run the documented one of its kind: its figures, recipe and data counts. The
    tolerance and the int8 claim are policy: kept from the previous entry."""
    if manifest.provenance.get("extra_data"):
        raise ValueError(f"{tag} was trained with --extra-data: the documented run is one on the bundled data alone")
    path = path or DOCUMENTED
    data = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    kind = for_task(manifest.task).kind
    old = data["models"].get(kind, {"tolerance": 0.015, "int8_max_drop": 0.01})
    run = measured(manifest.metrics)
    data["models"][kind] = {
        "run": tag,
        "machine": machine,
        "tolerance": old["tolerance"],
        "int8_max_drop": old["int8_max_drop"],
        "figures": {k: round(run[k], 4) for k in FIGURES if k in run},
        "recipe": recipe(manifest.training_config),
        "data_counts": manifest.provenance.get("counts"),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data["models"][kind]
