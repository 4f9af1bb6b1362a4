"""Labelling-queue CLI (torch- and BentoML-free): `python -m serving.feedback COMMAND`.

  list [--model M] [--unlabelled]   one line per item (id, model, reason, prediction, label)
  show ID                           the item's metadata and its (scrubbed) text or image path
  select --model M --count N --out DIR
                                    a labelling sheet (DIR/labels.csv, empty label column) of N unlabelled
                                    items, balanced across predicted classes
  label ID LABEL                    set the label of one item
  import-labels FILE.csv            apply `id,label` rows (a filled-in sheet)
  export --model M --out DIR        labelled items as a training set + feedback_provenance.json
  purge                             delete items older than the retention period

The queue folder and retention come from `SERVABLE_FEEDBACK_DIR` / `_RETENTION_DAYS`, or --dir /
--retention-days.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from servable.config import FeedbackSettings
from serving.feedback import selection
from serving.feedback.store import FeedbackError, FeedbackStore


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving.feedback", description=__doc__.split("\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])  # fmt: skip
    p.add_argument("--dir", type=Path, help="queue root (default: SERVABLE_FEEDBACK_DIR or runs/feedback)")
    p.add_argument("--retention-days", type=float, help="override SERVABLE_FEEDBACK_RETENTION_DAYS")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="list queued items")
    ls.add_argument("--model")
    ls.add_argument("--unlabelled", action="store_true", help="only items without a label")
    ls.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show = sub.add_parser("show", help="one item: metadata and content")
    show.add_argument("id")
    sel = sub.add_parser("select", help="a labelling sheet of unlabelled items, balanced across predicted classes")
    sel.add_argument("--model", required=True)
    sel.add_argument("--count", type=int, required=True, help="items on the sheet (round-robin over classes)")
    sel.add_argument("--out", type=Path, required=True, help="a new folder for labels.csv (and images/)")
    lab = sub.add_parser("label", help="label one item")
    lab.add_argument("id")
    lab.add_argument("label")
    imp = sub.add_parser("import-labels", help="apply labels from a CSV with id,label columns")
    imp.add_argument("file", type=Path)
    exp = sub.add_parser("export", help="labelled items as a training data set")
    exp.add_argument("--model", required=True)
    exp.add_argument("--out", type=Path, required=True)
    sub.add_parser("purge", help="delete items older than the retention period")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = {k: v for k, v in (("dir", args.dir), ("retention_days", args.retention_days)) if v is not None}
    store = FeedbackStore(FeedbackSettings(**overrides))
    try:
        if args.command == "list":
            for it in store.items(args.model):
                m = it.meta
                if args.unlabelled and m.get("label"):
                    continue
                if args.json:
                    print(json.dumps(m))
                else:
                    print(f"{m['id']}  {m['model']:<16} {m['kind']:<5} {m['reason']:<14} "
                          f"{m['predicted_label']!s:<14} {m['confidence']:.3f}  {m['created']}  "
                          f"label={m.get('label')}")  # fmt: skip
        elif args.command == "show":
            it = store.get(args.id)
            print(json.dumps(it.meta, indent=1))
            if it.meta["kind"] == "text":
                print(it.content_path.read_text(encoding="utf-8"))
            else:
                print(it.content_path)
        elif args.command == "select":
            chosen = selection.balanced(store.items(args.model), args.count)
            sheet = selection.write_sheet(chosen, args.out)
            counts = ", ".join(f"{k} {v}" for k, v in selection.by_class(chosen).items())
            print(f"{len(chosen)} item(s) to label in {sheet} (by predicted class: {counts})")
            print(f"fill in its label column, then: python -m serving.feedback import-labels {sheet}")
        elif args.command == "label":
            it = store.label(args.id, args.label)
            print(f"{it.meta['id']}: {it.meta['label']}")
        elif args.command == "import-labels":
            done, missing = store.import_labels(args.file)
            print(f"labelled {done} item(s)" + (f"; not found: {', '.join(missing)}" if missing else ""))
            return 1 if missing else 0
        elif args.command == "export":
            prov = store.export(args.model, args.out)
            where = args.out / prov["file"] if prov["kind"] == "text" else args.out
            kind, only = ("text", "--data-file") if prov["kind"] == "text" else ("image", "--data-dir")
            print(f"exported {prov['counts']['items']} item(s) to {where}")
            print(f"add them to the bundled training data: python -m training {kind} --extra-data {args.out}")
            print(f"or train on them alone: python -m training {kind} {only} {where}")
        elif args.command == "purge":
            print(f"deleted {store.purge()} item(s) older than {store.settings.retention_days:g} days")
    except (FeedbackError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
