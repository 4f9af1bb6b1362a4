"""End of the main job: what was made, how good it is, and what to run next."""

from __future__ import annotations

from servable import artifact
from training.tasks import TASKS


def latest(name: str) -> artifact.Artifact | None:
    try:
        return artifact.load(f"{name}:latest")
    except artifact.ArtifactError:
        return None


def main() -> None:
    print("\n=== Servable: what this run made ===")
    for name in (task.default_name for task in TASKS.values()):  # what `make all` trains: the defaults
        art = latest(name)
        if art is None:
            print(f"- {name}: not in the model store")
            continue
        m = art.manifest.metrics["test"]
        accs = ", ".join(f"{v} {r['accuracy']:.4f}" for v, r in m.items())
        ood = m["fp32"].get("out_of_domain")
        print(f"- {art.tag}  ({art.manifest.task})")
        print(f"    test accuracy: {accs}" + (f"; out-of-domain fp32 {ood['accuracy']:.4f}" if ood else ""))
        print(f"    files: {', '.join(sorted(art.manifest.onnx.values()))} + manifest.json (sha256 of every file)")
        print(f"    stored at: {art.path}")
    print("\nModel store: `.venv/bin/bentoml models list` shows the tags.")
    print("Metrics, curves and confusion matrices sit next to each model (metrics.json, curves.png, confusion.png).")


if __name__ == "__main__":
    main()
