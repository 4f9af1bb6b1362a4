"""Write the API reference from the services' own OpenAPI: `python -m serving.openapi_docs`.

`docs/api/<service>.openapi.json` is exactly what `GET /docs.json` serves (BentoML builds it
from the routes and `serving/schemas.py`), and `docs/api.md` lists its operations; a test fails
when either is stale, so the reference cannot drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from servable.config import SERVED_MODELS

DOCS = Path(__file__).resolve().parents[1] / "docs"
SERVICES = {e.docs_name: e.service for e in SERVED_MODELS.values()}


def spec(target: str) -> dict:
    import importlib

    module, name = target.split(":")
    service = getattr(importlib.import_module(module), name)
    return service.openapi_spec.asdict()


def render_index(specs: dict[str, dict]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the services' own OpenAPI by `python -m serving.openapi_docs` (do not edit by hand;",
        "`tests/test_docs.py` fails when it is stale). The full documents, with request and response",
        "schemas, are in `docs/api/` and are served live at `GET /docs.json` (interactive: `/docs`).",
        "Errors, metrics and examples: [serving.md](serving.md); the Open Inference Protocol (V2), what of it",
        "is supported and examples with `requests` and tritonclient:",
        "[serving.md](serving.md#open-inference-protocol-v2).",
        "",
    ]
    for name, doc in specs.items():
        lines += [f"## {name} (`docs/api/{name}.openapi.json`)", "", "| method | path | summary | answers |",
                  "|---|---|---|---|"]  # fmt: skip
        for path, ops in doc["paths"].items():
            for method, op in ops.items():
                summary = (op.get("description") or op.get("summary") or "").split("\n")[0].replace("|", "\\|")
                codes = ", ".join(sorted(op.get("responses", {})))
                lines.append(f"| {method.upper()} | `{path}` | {summary} | {codes} |")
        lines.append("")
    return "\n".join(lines)


def outputs() -> dict[Path, str]:
    specs = {name: spec(target) for name, target in SERVICES.items()}
    files = {DOCS / "api" / f"{n}.openapi.json": json.dumps(d, indent=1, sort_keys=True) + "\n"
             for n, d in specs.items()}  # fmt: skip
    files[DOCS / "api.md"] = render_index(specs)
    return files


def main() -> int:
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
