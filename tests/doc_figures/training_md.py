"""Figures of index.md and training.md: the documented runs, the rendered study tables, the limited-data table."""

from __future__ import annotations

import importlib
import json
import re
import statistics
from collections.abc import Callable

from tests.doc_figures.common import BENCH, DOCUMENTED, ROOT, Figure, span

GALLERY = "docs/results/training/gallery/{}/summary.json"
MISTAKES = "docs/results/training/gallery/{}/gallery.json"  # the gallery's mistakes, the most confident first
PER_CLASS = "docs/results/training/gallery/{}/per_class.md"
NUMBERS = {8: "eight", 10: "ten"}
# the first version (32 px) of make limited-data (the fair study's figures: LIMITED_FAIR below)
LIMITED = "docs/results/limited_data/first-version-32px/limited_data.json"
CLIP = "docs/results/training/clip-norms.json"  # the default runs' per-epoch gradient norms (their history.json)
SAFETY_NET = "docs/results/training/clip-safety-net.json"  # the default recipes at the safety-net thresholds

# training.md's limited-data table: its row labels, the arm of each; bold marks the best of the three models
LIMITED_ROWS = {
    "EfficientNet-Lite0 (32 px), ImageNet-pretrained, fine-tuned": "pretrained",
    "EfficientNet-Lite0 (32 px), from scratch": "efficientnet-scratch",
    "small CNN (28 px), from scratch": "small-cnn",
    "small CNN, without augmentation": "no-augmentation",
    "small CNN + pseudo-labels": "pseudo-label",
    "small CNN, active learning (least confident)": "active",
}


LIMITED_MODELS = ("pretrained", "efficientnet-scratch", "small-cnn")


IMAGE_CARD, TEXT_CARD = "docs/model-cards/fashion-cnn.md", "docs/model-cards/sentiment-bert.md"


def variant(card: dict, name: str, column: str = "test accuracy") -> str:
    """A cell of the card's fp32 / int8 (/ optimised) table."""
    return card["tables"]["variant"][0][name][column]


def gate(card: dict) -> str:
    """The card's release-gate verdict: passed when every check it lists passed."""
    checks = card["text"].split("**Release gate**")[1].split("\n## ")[0]
    verdicts = re.findall(r"^- .*: (pass|fail)$", checks, re.M)
    return "passed" if verdicts and set(verdicts) == {"pass"} else "failed"


def confusions(card: dict) -> list[tuple[str, ...]]:
    """The card's most frequent mistakes: (true class, predicted class, times), most frequent first."""
    line = re.search(r"^- most frequent mistakes: (.*)$", card["text"], re.M)[1]
    return [re.match(r"(.+) called (.+) (\d+) times", item).groups() for item in line.split("; ")]


def top_confusions(card: dict) -> str:
    """The first three, as training.md reads them (the second and third share their true class)."""
    (a, b, n), (c, d, m), (e, f, k) = confusions(card)[:3]
    assert c == e, "training.md's sentence names one true class for the second and third"
    return f"{a} called {b} {n} times, {c} called {d} {m} and {f} {k} times"


def documented_fp32(card: dict) -> tuple[str, str]:
    """The card's fp32 gate line: the run's test accuracy and the documented figure it was held to."""
    return re.search(r"^- fp32 test accuracy ([\d.]+) \(documented ([\d.]+) ", card["text"], re.M).groups()


def card_record(card: dict, name: str) -> dict:
    """A record the card prints as JSON on a line of its own (`- counts by domain: {...}`)."""
    return json.loads(re.search(rf"^- {name}: (.*)$", card["text"], re.M)[1])


def domain_row(card: dict, domain: str) -> dict:
    return card["tables"]["domain"][0][domain]


def gate_fp32(card: dict, what: str) -> tuple[str, str]:
    """A gate line of the card's: the run's fp32 figure and the documented one it was held to."""
    return re.search(rf"^- fp32 {what} ([\d.]+) \(documented ([\d.]+) ", card["text"], re.M).groups()


def text_counts(c: dict) -> str:
    counts, dedup = card_record(c, "counts by domain"), card_record(c, "dedup")["in_domain"]
    by_domain = ", ".join(
        f"{d} {counts[d]['train']:,} / {counts[d]['val']:,} / {counts[d]['test']:,}" for d in card_record(c, "domains")
    )  # the trained domains, in the card's order
    return (f"{by_domain} ({dedup['kept']:,} de-duplicated in-domain sentences, "
            f"{dedup['conflicting_labels_dropped']} with conflicting labels dropped)")  # fmt: skip


def agreement(card: dict) -> float:
    """int8/fp32 agreement on the test set, as the card's gate line has it."""
    return float(re.search(r"agreement on the test set ([\d.]+)", card["text"])[1])


def training_examples(c: dict) -> int:
    return int(c["tables"]["split"][0]["training"]["examples"].replace(",", ""))


def movies_train(c: dict) -> int:
    return card_record(c, "counts by domain")["movies"]["train"]


def same_as_documented(c: dict) -> str:
    (test, documented_test), (ood, documented_ood) = (
        gate_fp32(c, "test accuracy"),
        gate_fp32(c, "out-of-domain accuracy"),
    )
    verdict = "equal to" if (test, ood) == (documented_test, documented_ood) else "unlike"
    return (
        f"`{c['tag']}`, the same recipe run again in a `make all` on the same day, whose release gate found "
        f"its fp32 figures {verdict} this run's ({test} in domain, {ood} out of domain)"
    )


def epochs(d: dict, model: str) -> list[dict]:
    return d["models"][model]["epochs"]


def clipping_measured(d: dict) -> str:
    """training.md's clipping section: the share of steps clipped, the mean norms, the runs' tags."""
    clipped = {m: " then ".join(dict.fromkeys(str(round(e["clipped_fraction"], 2)) for e in epochs(d, m)))
               for m in ("image", "text")}  # fmt: skip
    return (f"(`clipped_fraction` {clipped['image']} for the image model, {clipped['text']} for the text model): the "
            f"gradient norm before clipping averaged {span(e['grad_norm'] for e in epochs(d, 'image'))} (image) and "
            f"{span(e['grad_norm'] for e in epochs(d, 'text'))} (text)")  # fmt: skip


def clipping_safety_net(d: dict) -> str:
    """The safety-net runs against the documented clip-1.0 runs (the same recipe and kind of machine)."""
    from tests.doc_figures.common import results

    img, txt = d["models"]["image"]["figures"], d["models"]["text"]["figures"]
    doc = {k: m["figures"] for k, m in results(DOCUMENTED)["models"].items()}
    assert all(e["clipped_fraction"] == 0 for m in d["models"].values() for e in m["epochs"])  # "stayed idle"
    assert d["machine"].startswith(results(DOCUMENTED)["models"]["image"]["machine"].split(",")[0])
    return (
        f"| image, fp32 test accuracy | {doc['image']['test_accuracy']} | {img['fp32_test_accuracy']} |\n"
        f"| image, int8 accuracy lost against fp32 (full-range int8 weights) | within the gate's 1 point | "
        f"**{100 * img['int8_accuracy_drop']:.2f} points** |\n"
        f"| text, fp32 test accuracy in domain | {doc['text']['test_accuracy']} | {txt['fp32_test_accuracy']} |\n"
        f"| text, fp32 accuracy on Amazon (held out) | {doc['text']['out_of_domain_accuracy']} | "
        f"{txt['fp32_out_of_domain_accuracy']} |"
    )


def clipping_safety_net_norms(d: dict) -> str:
    image, text = (max(e["grad_norm_max"] for e in d["models"][k]["epochs"]) for k in ("image", "text"))
    where = "(image, the first epoch after the backbone is unfrozen)"
    return f"the largest norm {image:.1f} {where} and {text:.1f}\n(text)"


def clipping_thresholds(d: dict) -> str:
    """Each epoch's largest norm, the highest first (the epoch after unfreezing), and the thresholds derived."""
    from training.loop import clip_threshold  # imports torch: only when run

    image = sorted((e for e in epochs(d, "image")), key=lambda e: -e["grad_norm_max"])
    top, *rest = image
    assert (top["stage"], top["epoch"]) == ("finetune", 1), top  # "the first epoch after unfreezing the backbone"
    text = max(e["grad_norm_max"] for e in epochs(d, "text"))
    others = " and ".join(f"{e['grad_norm_max']:.1f}" for e in sorted(rest, key=lambda e: e["grad_norm_max"]))
    return (
        f"stood in: {top['grad_norm_max']:.1f} for the image model (the first epoch after unfreezing the "
        f"backbone; {others} in the other two) and {text:.1f} for the text model, so the measured thresholds are "
        f"`--clip-norm {clip_threshold(epochs(d, 'image')):.3g}` (image) and "
        f"`{clip_threshold(epochs(d, 'text')):.3g}` (text)"
    )


def weakest_class(d: dict) -> str:
    rows = d["tables"]["class"][0]
    weakest = min(rows, key=lambda c: float(rows[c]["F1"]))
    return f"The weakest class is {weakest} (F1 {float(rows[weakest]['F1']):.2f} in"


def word_score(mistakes: list[dict], word: str) -> str:
    """The drop in the wrong class's log-odds without this word, in the one mistake that holds it."""
    (found,) = [w["score"] for m in mistakes for w in m["words"] if w["word"] == word]
    return f"{found:.1f}"


def mean_acc(d: dict, arm: str, size: int) -> float:
    return d["summary"][arm][str(size)]["mean"]


def scratch_learned(d: dict) -> str:
    runs = [r for arm in ("efficientnet-scratch", "small-cnn") for size in d["runs"][arm] for r in d["runs"][arm][size]]
    learned = [r for r in runs if r["train_loss"][-1] < r["train_loss"][0]]
    last = [r["train_acc"][-1] for r in runs]
    return (
        f"**Every from-scratch run learned** ({len(learned)} of {len(runs)}: loss fell, training accuracy "
        f"{min(last):.2f}-{max(last):.2f} on the last epoch)"
    )


def pseudo_labels(d: dict) -> str:
    """How many pseudo-labels cleared the cut per size (mean over seeds) and how often they were right."""
    runs = d["runs"]["pseudo-label"]
    count = {int(s): statistics.mean(r["pseudo_labels"] for r in runs[s]) for s in runs}
    right = {int(s): statistics.mean(r["pseudo_label_accuracy"] for r in runs[s]) for s in runs}
    upper = [s for s in count if s >= 1000]
    (right_up,) = {f"{100 * right[s]:.0f}" for s in upper}
    return (
        f"were right {right_up} % of the time from 1,000 labels up ({min(count[s] for s in upper):,.0f}-"
        f"{max(count[s] for s in upper):,.0f} of them per size, on average), so they added little the model did "
        f"not already know; at 300 labels only {count[300]:.0f} cleared the 0.95 cut, {100 * right[300]:.0f} % "
        "right"
    )


def pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def image_calibration(d: dict) -> str:
    """training.md's reading of the image model's calibration table."""
    s = d["sets"]
    test, rot, noise, digits = s["test"], s["test rotated ±25°"], s["test with noise σ 10"], s["digits"]
    shifted_ece = [v for x in (rot, noise) for v in x["ece"].values()]
    below = sorted(pct(x["below_threshold_share"]).removesuffix(" %") for x in (rot, noise))
    ece, rot_ece = test["ece"], rot["ece"]
    return (
        f"(ECE {ece['raw']:.3f}; T = {d['temperature']:.2f} softens it slightly, to {ece['calibrated']:.3f}), and at "
        f"80 % coverage it is right {pct(test['selective_accuracy_at_80pct'])} of the time. Out of domain it stays "
        f"roughly honest on average (ECE {min(shifted_ece):.2f}–{max(shifted_ece):.2f}) but *under*-confident on the "
        "rotated images, where the temperature fitted in domain makes ECE a little worse "
        f"({rot_ece['raw']:.3f} → {rot_ece['calibrated']:.3f}): a temperature is fitted for one distribution. What "
        f"the threshold buys is the larger effect: {below[0]}–{below[1]} % of the shifted answers fall below it, and "
        f"those above it are right {pct(rot['accuracy_above_threshold'])} (rotated) and "
        f"{pct(noise['accuracy_above_threshold'])} (noise) of the time, against {pct(rot['accuracy'])} and "
        f"{pct(noise['accuracy'])} overall; {pct(digits['below_threshold_share'])} of the digits"
    )


def text_calibration(d: dict) -> str:
    """training.md's reading of the text model's calibration table."""
    test, amazon = d["sets"]["test"], d["sets"]["amazon (held out)"]
    (right,) = {pct(x["selective_accuracy_at_80pct"]) for x in (test, amazon)}  # "in and out of domain": one figure
    (below_right,) = {f"{x['accuracy_below_threshold']:.2f}" for x in (test, amazon)}
    return (
        f"(mean top-1 probability {test['mean_confidence']['raw']:.2f} for {test['accuracy']:.2f} accuracy; ECE "
        f"{test['ece']['raw']:.3f}); T = {d['temperature']:.2f} brings ECE to {test['ece']['calibrated']:.3f} in "
        f"domain and {amazon['ece']['calibrated']:.3f} on the held-out Amazon reviews, where its accuracy happens "
        f"to match the in-domain one. At 80 % coverage it is right {right} of the time in and out of domain; the "
        f"answers below the threshold ({d['abstain_below']:.3f}) are right about {pct(float(below_right))} of the time"
    )


def rendered(module: str, name: str) -> Figure:
    """A table of training.md rendered by its module's markdown_table from the JSON the module wrote."""

    def quote(d: dict) -> str:
        return importlib.import_module(f"training.{module}").markdown_table(d)

    return Figure("docs/training.md", f"docs/results/{module}/{name}.json", quote, f"{module} table: {name}")


def beats_both(d: dict, absence: str) -> str:
    return f"{100 * d['absence'][absence]['explanation_beats_both_baselines_share']:.0f} %"


def limited_row(label: str) -> Callable[[dict], str]:
    arm = LIMITED_ROWS[label]

    def row(d: dict) -> str:
        from training.limited_data import fmt  # the report's own cell format (imports torch: only when run)

        summary, cells = d["summary"], []
        for size in map(str, d["config"]["sizes"]):
            best = max(LIMITED_MODELS, key=lambda a: summary[a][size]["mean"])
            cell = fmt(summary[arm][size])
            cells.append(f"**{cell}**" if arm == best else cell)
        return f"| {label} | " + " | ".join(cells) + " |"

    return row


FIGURES = [
    # index.md: the reference models (benchmark.json's tags and machine) and today's documented runs
    *(Figure("docs/index.md", BENCH, lambda d, i=i: (
        f"| `{d['models'][i]['tag']}` | {d['machine'].split(', Python')[0]} | [benchmark]"), f"reference model {i}")
      for i in (0, 1)),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"| `{d['models']['image']['run']}` | {d['models']['image']['figures']['test_accuracy']:.4f} (Fashion-MNIST "
        f"test, {d['models']['image']['data_counts']['test']:,} images) | - |"), "documented image run"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"| `{d['models']['text']['run']}` | {d['models']['text']['figures']['test_accuracy']:.4f} "
        f"({d['models']['text']['data_counts']['test']:,} held-out sentences) | "
        f"{d['models']['text']['figures']['out_of_domain_accuracy']:.4f} "
        f"({d['models']['text']['data_counts']['ood_test']:,} Amazon review sentences) |"), "documented text run"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"holds every default run to, within {100 * d['models']['image']['tolerance']:.1f} points"), "gate tolerance"),
    Figure("docs/index.md", DOCUMENTED, lambda d: (
        f"loses more than {100 * d['models']['image']['int8_max_drop']:.0f} point of test accuracy"), "int8 bound"),
    # training.md: the documented default runs' headline figures and data counts
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"{d['models']['image']['data_counts']['train']:,} training / {d['models']['image']['data_counts']['val']:,} "
        f"validation images at 64 px"), "image data counts"),
    Figure("docs/training.md", DOCUMENTED, lambda d: f"Run `{d['models']['image']['run']}` (2026-11-30, AMD EPYC",
           "image run"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, full {d['models']['image']['data_counts']['test']:,}-image test set | "
        f"**{d['models']['image']['figures']['test_accuracy']:.4f}** |"), "image test accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"lifted test accuracy to {d['models']['image']['figures']['test_accuracy']:.4f},"),
        "image test accuracy, prose"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"with seed 42, {d['models']['text']['data_counts']['train']:,} training / "
        f"{d['models']['text']['data_counts']['val']:,} validation / "
        f"{d['models']['text']['data_counts']['test']:,} test sentences"), "text data counts"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"the Amazon out-of-domain set has {d['models']['text']['data_counts']['ood_test']:,} sentences"),
        "text out-of-domain count"),
    Figure("docs/training.md", DOCUMENTED, lambda d: f"(run `{d['models']['text']['run']}`, seed 42", "text run"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, in-domain test, pooled ({d['models']['text']['data_counts']['test']:,}) | "
        f"**{d['models']['text']['figures']['test_accuracy']:.4f}** |"), "text test accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"| accuracy, out-of-domain Amazon ({d['models']['text']['data_counts']['ood_test']:,}) | "
        f"**{d['models']['text']['figures']['out_of_domain_accuracy']:.4f}** |"), "text out-of-domain accuracy"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"int8 agrees with fp32 on {100 * d['models']['text']['figures']['int8_agreement']:.1f} % of the in-domain "
        "test sentences"), "text int8 agreement"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"**In domain: {d['models']['text']['figures']['test_accuracy']:.3f} pooled on seed 42**"), "text, prose"),
    Figure("docs/training.md", DOCUMENTED, lambda d: (
        f"**Out of domain, seed 42: {d['models']['text']['figures']['out_of_domain_accuracy']:.3f}**"),
        "text out of domain, prose"),
    # training.md: the calibration and faithfulness tables, rendered from their JSON, and the gallery's runs
    *(rendered(module, name) for module in ("calibration", "faithfulness")
      for name in ("fashion-cnn", "sentiment-bert")),
    Figure("docs/training.md", "docs/results/faithfulness/fashion-cnn.json", lambda d: (
        f"it beats both baselines on {beats_both(d, 'background [0.0, 0.0, 0.0]')} of the images). With the image mean "
        f"as the mask, its order beats both baselines ({beats_both(d, 'image mean (older)')} of the images)"),
        "faithfulness: image wins"),
    Figure("docs/training.md", "docs/results/faithfulness/sentiment-bert.json", lambda d: (
        f"the explanation beats both baselines on {beats_both(d, 'token [MASK]')} of the texts either way"),
        "faithfulness: text wins"),
    Figure("docs/training.md", GALLERY.format("image"), lambda d: (
        f"({d['accuracy']:.4f} on the {d['test_examples']:,} Fashion-MNIST test images for `{d['model']}`"),
        "gallery: image run"),
    Figure("docs/training.md", GALLERY.format("text"), lambda d: (
        f"{d['accuracy']:.4f} on the {d['test_examples']:,} test sentences for `{d['model']}`)"), "gallery: text run"),
    # training.md: gradient clipping, from the default runs' recorded norms
    Figure("docs/training.md", CLIP, clipping_measured, "clipping: shares and mean norms"),
    Figure("docs/training.md", CLIP, clipping_thresholds, "clipping: largest norms and thresholds"),
    Figure("docs/training.md", SAFETY_NET, clipping_safety_net, "clipping: the safety-net runs against clip 1.0"),
    Figure("docs/training.md", SAFETY_NET, clipping_safety_net_norms, "clipping: the safety-net runs' norms"),
    Figure("docs/training.md", "docs/results/training/int8-reduce-range.json", lambda d: (
        f"the same model's int8 scored\n{d['int8_reduce_range_True']['accuracy']} against fp32's {d['fp32']} "
        f"and agreed "
        f"with it on {100 * d['int8_reduce_range_True']['agreement_with_fp32']:.1f} % of the test images "
        f"({d['int8_reduce_range_False']['agreement_with_fp32']} with full-range weights"), "int8 with 7-bit weights"),
    Figure("docs/training.md", CLIP, lambda d: (
        f"`make all` of 2026-12-06 on the default recipe (`{d['models']['image']['tag']}`,\n"
        f"`{d['models']['text']['tag']}`,"), "clipping: the runs"),
    # training.md: the galleries' mistakes and per-class figures (python -m training gallery)
    Figure("docs/training.md", MISTAKES.format("image"), lambda g: (
        f"The {NUMBERS[len(g)]} most confident mistakes (`{MISTAKES.format('image')}`) are all at "
        f"{min(m['confidence'] for m in g):.4f} or more confidence"), "gallery: image mistakes"),
    Figure("docs/training.md", PER_CLASS.format("image"), weakest_class, "gallery: weakest image class"),
    Figure("docs/training.md", MISTAKES.format("text"), lambda g: (
        f"(the {NUMBERS[len(g)]} most confident mistakes; each word with the drop in the log-odds of the wrong class "
        f"without it; `{MISTAKES.format('text')}`). All {NUMBERS[len(g)]} are at "
        f"{min(m['confidence'] for m in g):.3f} or more confidence;"), "gallery: text mistakes"),
    Figure("docs/training.md", MISTAKES.format("text"), lambda g: (
        f'removing "nonsense." lowers the negative log-odds by {word_score(g, "nonsense.")}), "The Enterprise is '
        f'**losing** speed." ({word_score(g, "losing")}), "...it\'s also **disappointing**..." '
        f'({word_score(g, "disappointing")}), and negatives read as positive on "**lightweight,**" '
        f'({word_score(g, "lightweight,")}) or "**solid**" ({word_score(g, "solid")})'), "gallery: text word scores"),
    # training.md: the readings of make limited-data's table
    Figure("docs/training.md", LIMITED, lambda d: (
        f"(`make limited-data`, {d['date'][:10]}, AMD EPYC, 2 cores, no GPU: {d['minutes']} minutes of compute"),
        "limited data: the run"),
    Figure("docs/training.md", LIMITED, lambda d: (
        f"by {100 * (mean_acc(d, 'small-cnn', 300) - mean_acc(d, 'pretrained', 300)):.0f} points at 300 labels over "
        "the pretrained one"), "limited data: the small CNN's lead"),
    Figure("docs/training.md", LIMITED, lambda d: (
        "at 10,000 labels the pretrained network is first ({:.3f}, against {:.3f} and {:.3f})".format(
            *(mean_acc(d, arm, 10000) for arm in ("pretrained", "small-cnn", "efficientnet-scratch")))),
        "limited data: the crossing"),
    Figure("docs/training.md", LIMITED, scratch_learned, "limited data: every from-scratch run learned"),
    Figure("docs/training.md", LIMITED, pseudo_labels, "limited data: pseudo-labels"),
    Figure("docs/training.md", LIMITED, lambda d: "the rarest class got {} of the chosen labels".format(span(
        (100 * r["smallest_class_share"] for runs in d["runs"]["active"].values() for r in runs), " %")),
        "limited data: active learning's rarest class"),
    # training.md: the readings of the calibration tables
    Figure("docs/training.md", "docs/results/calibration/fashion-cnn.json", image_calibration, "calibration: image"),
    Figure("docs/training.md", "docs/results/calibration/sentiment-bert.json", text_calibration, "calibration: text"),
    # training.md: make limited-data's table
    *(Figure("docs/training.md", LIMITED, limited_row(label), f"limited data: {LIMITED_ROWS[label]}")
      for label in LIMITED_ROWS),
    # training.md: the model cards' figures (the cards are generated from their run's artifact at registration)
    Figure("docs/training.md", IMAGE_CARD, lambda c: (
        f"(`{c['tag']}`, two torch threads: fp32 {variant(c, 'fp32')}, int8 {variant(c, 'int8')}, gate {gate(c)})"),
        "image card: fp32, int8, gate"),
    Figure("docs/training.md", IMAGE_CARD, lambda c: f"lists the most frequent confusions: {top_confusions(c)}",
           "image card: confusions"),
    Figure("docs/training.md", IMAGE_CARD, lambda c: f"`{c['tag']}` and `sentiment-bert:", "card section: image tag"),
    Figure("docs/training.md", TEXT_CARD, lambda c: f"and `{c['tag']}`, with the gate's verdict",
           "card section: text tag"),
    Figure("docs/training.md", IMAGE_CARD, lambda c: (
        "its fp32 accuracy is {} against {}".format(*documented_fp32(c))), "card section: image fp32 vs documented"),
    # training.md's text section: the sentiment card's per-domain counts and figures
    Figure("docs/training.md", TEXT_CARD, text_counts, "text card: counts by domain"),
    Figure("docs/training.md", TEXT_CARD, lambda c: (
        f"That is {training_examples(c) / movies_train(c):.2f} times the movie-only training set (the earlier "
        f"default, now `--domains movies`: the same {movies_train(c):,} movie sentences)"), "text card: 1.48 times"),
    Figure("docs/training.md", TEXT_CARD, same_as_documented, "text card: its run against the documented one"),
    Figure("docs/training.md", TEXT_CARD, lambda c: (
        f"{domain_row(c, 'amazon')['false positives']} negatives called positive against "
        f"{domain_row(c, 'amazon')['false negatives']} positives called negative"), "text card: Amazon errors"),
    Figure("docs/training.md", TEXT_CARD, lambda c: (
        f"the movie share alone is {domain_row(c, 'movies')['accuracy']}, tweets are easy "
        f"({domain_row(c, 'tweets')['accuracy']}), NYT editorial sentences hard "
        f"({domain_row(c, 'editorials')['accuracy']})"), "text card: accuracy by domain"),
    # training.md's whole main job: the 2026-11-30 make all the cards come from
    Figure("docs/training.md", IMAGE_CARD, lambda c: (
        f"image fp32 {variant(c, 'fp32')}, int8 {variant(c, 'int8')}, gate {gate(c)}"), "whole job: image card"),
    Figure("docs/training.md", TEXT_CARD, lambda c: (
        f"text fp32 {variant(c, 'fp32')} in domain and {variant(c, 'fp32', 'out-of-domain')} out of domain, int8 "
        f"{variant(c, 'int8')}, agreement {agreement(c):.3f}, "
        f"gate {gate(c)}"), "whole job: text card"),
]  # fmt: skip


METHOD_ARMS = {"no-augmentation": "without augmentation", "pseudo-label": "pseudo-labels", "active": "active learning"}


def paired_means(d: dict) -> dict[tuple[str, str], list[float]]:
    """Each method's test accuracy minus the small CNN's, seed by seed, per labelled size."""
    runs = d["runs"]
    return {(arm, size): [a["accuracy"] - b["accuracy"] for a, b in zip(runs[arm][size], runs["small-cnn"][size],
                                                                        strict=True)]
            for arm in METHOD_ARMS for size in runs[arm]}  # fmt: skip


def methods_paired(d: dict) -> str:
    """training.md's reading of the three methods: the largest mean move, the largest gain, the loss on every seed."""
    diffs = paired_means(d)
    mean = {k: sum(v) / len(v) for k, v in diffs.items()}
    gain_at = max(mean, key=mean.get)
    loss_at = min(mean, key=mean.get)
    assert all(x < 0 for x in diffs[loss_at]), diffs[loss_at]  # "on every seed"
    assert mean[gain_at] < statistics.stdev(diffs[gain_at]), diffs[gain_at]  # "within its seeds' spread"
    return (f"each moved mean accuracy by at most {max(abs(m) for m in mean.values()):.3f} at any size; the largest "
            f"gain, +{mean[gain_at]:.3f} ({METHOD_ARMS[gain_at[0]]}, {int(gain_at[1]):,} labels), lies within its "
            f"seeds' spread, and {METHOD_ARMS[loss_at[0]]} cost {-mean[loss_at]:.3f} at {int(loss_at[1]):,} labels on "
            "every seed")  # fmt: skip


FIGURES.append(Figure("docs/training.md", LIMITED, methods_paired, "limited data: the three methods, paired by seed"))


DOMAIN_STUDY = "docs/results/domain_study/domain_study.json"
DOMAIN_STUDY_DOMAINS = ("amazon", "movies")  # the study's default domains, the rows training.md prints


def domain_study_row(domain: str, arm: str) -> Callable[[dict], str]:
    """A row of training.md's domain-study table: the report's own cells (mean ± sd (n=seeds), — when not run)."""

    def row(d: dict) -> str:
        from training.domain_study import LABELS, fmt  # the report's own format (imports torch: only when run)

        cells = d["summary"].get(domain, {}).get(arm, {})
        return (f"| {domain} | {LABELS[arm]} | "
                + " | ".join(fmt(cells.get(str(k))) for k in d["config"]["labels_added"]) + " |")  # fmt: skip

    return row


FIGURES += [
    Figure("docs/training.md", DOMAIN_STUDY, domain_study_row(domain, arm), f"domain study: {domain}, {arm}")
    for domain in DOMAIN_STUDY_DOMAINS for arm in ("random", "active")
]  # fmt: skip

DOMAIN_STUDY_ONE_PROCESS = "docs/results/domain_study/one-process/domain_study.json"
CELL_FIGURES = ("accuracy", "false_positive", "false_negative", "base_domains_accuracy", "chosen_positive_share",
                "epochs_run", "best_epoch", "replayed")  # fmt: skip


def domain_study_cost(d: dict) -> str:
    assert not d["missing"] and "Xeon" in d["machine"]
    bases = [b["seconds"] / 60 for b in d["bases"].values()]
    medians = [statistics.median(c["seconds"] / 60 for c in d["cells"] if c["k"] == k)
               for k in d["config"]["labels_added"][1:]]  # fmt: skip
    assert max(medians) == medians[-1]  # "k = 1,000 the dearest"
    own = (sum(b["seconds"] for b in d["bases"].values()) + sum(c["seconds"] for c in d["cells"])) / 60
    return (f"**{d['minutes']} minutes for the {len(d['cells'])} cells, in one sitting**, within the study's budget of "
            f"about 30 minutes on 2 cores. A base model took {min(bases):.1f}-{max(bases):.1f} minutes, an adaptation "
            f"cell a median of {min(medians):.1f}-{max(medians):.1f} minutes by k (k = 1,000 the dearest); the bases' "
            f"and cells' own times add up to {own:.1f} minutes")  # fmt: skip


def same_cells_as_one_process(d: dict) -> str:
    """The run of the cells one after the other: every cell's figures equal the side-by-side run's."""
    parallel = json.loads((ROOT / DOMAIN_STUDY).read_text())
    key = lambda c: (c["domain"], c["seed"], c["arm"], c["k"])  # noqa: E731
    ours = {key(c): [c.get(f) for f in CELL_FIGURES] for c in d["cells"]}
    assert ours == {key(c): [c.get(f) for f in CELL_FIGURES] for c in parallel["cells"]}
    return f"{d['minutes']} minutes of compute in two sittings"


DOMAIN_STUDY_THREADS = "docs/results/domain_study/threads/two-threads.json"


def threads_level(d: dict) -> str:
    """One base model on two threads against one (the two runs' files sit side by side) and beside another cell."""
    two = d["bases"]["amazon|0"]["seconds"]
    one = json.loads((ROOT / DOMAIN_STUDY_THREADS).with_name("one-thread.json").read_text())["bases"]["amazon|0"]
    beside = json.loads((ROOT / DOMAIN_STUDY).read_text())["bases"]["amazon|0"]["seconds"]
    side_by_side, threads = 2 * one["seconds"] / beside, one["seconds"] / two  # each: bases per one-thread base time
    assert abs(side_by_side - threads) < 0.1 * threads, (side_by_side, threads)  # "level"
    return (
        f"one base model alone took {one['seconds']} s on one thread and {two} s on two ({threads:.2f} times as "
        f"fast), against {beside} s on one thread beside another cell"
    )


FIGURES += [
    Figure("docs/training.md", DOMAIN_STUDY_THREADS, threads_level, "domain study: threads against processes"),
    Figure("docs/training.md", DOMAIN_STUDY, domain_study_cost, "domain study: cost, side by side"),
    Figure("docs/training.md", DOMAIN_STUDY_ONE_PROCESS, same_cells_as_one_process,
           "domain study: the same cells one after the other"),
]  # fmt: skip


TEXT_LEVERS = "docs/results/training/text_levers.json"
TEXT_BALANCE = "docs/results/training/text_class_balance.json"


def text_levers(render: str) -> Callable[[dict], str]:
    """training.md's text-lever table and means, rendered by training/text_levers.py from the runs' reports."""

    def quote(d: dict) -> str:
        from training import text_levers as tl  # imports numpy and the serving helpers only: cheap

        reports = list(d["runs"].values())
        return tl.table(reports).strip() if render == "table" else tl.held_out_means(reports)

    return quote


def text_balance(d: dict) -> str:
    from training.text_levers import balance_table

    return balance_table(d)


FIGURES.append(Figure("docs/training.md", TEXT_BALANCE, text_balance, "text: class balance by domain and split"))
FIGURES += [Figure("docs/training.md", TEXT_LEVERS, text_levers(r), f"text levers: {r}") for r in ("table", "means")]

# the opt-in MPNet backbone (make backbone-mpnet), held out on the same shortened recipe, and its cost per text
TEXT_LEVERS_MPNET = "docs/results/training/text_levers_mpnet.json"
MPNET_CEILING = "docs/results/benchmark/text-ceiling/mpnet/text_ceiling.json"


def mpnet_train_minutes(d: dict) -> str:
    runs = sorted(d["runs"].values(), key=lambda r: r["held_out"])
    return " and ".join(f"{r['train_seconds'] / 60:.0f}" for r in runs) + " minutes"


def mpnet_ms_per_text(d: dict) -> str:
    """fp32 MiniLM and MPNet at batch 1 and 32, one thread: wall ms per text, and MPNet over MiniLM."""
    small, large = d["one_thread"]["fp32"], d["one_thread"]["mpnet"]
    return ", ".join(f"batch {b}: {small[b]['wall_ms']:.1f} against {large[b]['wall_ms']:.1f} ms "
                     f"({large[b]['wall_ms'] / small[b]['wall_ms']:.1f} times)" for b in ("1", "32"))  # fmt: skip


FIGURES += [Figure("docs/training.md", TEXT_LEVERS_MPNET, text_levers(r), f"mpnet held out: {r}")
            for r in ("table", "means")]  # fmt: skip
FIGURES += [
    Figure("docs/training.md", TEXT_LEVERS_MPNET, mpnet_train_minutes, "mpnet: training minutes per run"),
    Figure("docs/training.md", MPNET_CEILING, mpnet_ms_per_text, "mpnet: model cost per text"),
]  # fmt: skip

# the fair limited-data study (make limited-data): one sitting from nothing, and the earlier run over several sittings
LIMITED_FAIR = "docs/results/limited_data/limited_data.json"
LIMITED_SITTINGS = "docs/results/limited_data/several-sittings/limited_data.json"
SIZES = ("300", "1000", "3000", "10000")


def limited_fair_sizes(d: dict) -> list[str]:
    seeds = len(d["config"]["seeds"])
    return [str(s) for s in d["config"]["sizes"]
            if all(d["summary"][arm].get(str(s), {}).get("n") == seeds for arm in d["summary"])]  # fmt: skip


def limited_fair_table(d: dict) -> str:
    from training.limited_data import LABELS  # imports torch: only when run

    sizes = limited_fair_sizes(d)
    rows = ["| arm | " + " | ".join(f"{int(s):,} labels" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for arm in d["summary"]:
        cells = [f"{d['summary'][arm][s]['mean']:.3f} ± {d['summary'][arm][s]['sd']:.3f}" for s in sizes]
        rows.append(f"| {LABELS[arm]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cell(d: dict, arm: str, size: str) -> str:
    return f"{d['summary'][arm][size]['mean']:.3f} ± {d['summary'][arm][size]['sd']:.3f}"


def cells_cpu_minutes(d: dict) -> float:
    return sum(r["cpu_seconds"] for by in d["runs"].values() for rs in by.values() for r in rs) / 60


def transfer_lead(d: dict) -> dict[str, float]:
    """Per size: the best transfer arm's lead over the small CNN from scratch, in points."""
    from training.limited_data import TRANSFER

    return {s: 100 * (max(d["summary"][a][s]["mean"] for a in TRANSFER) - d["summary"]["small-cnn"][s]["mean"])
            for s in limited_fair_sizes(d)}  # fmt: skip


def limited_fair_gap(d: dict) -> str:
    return ", ".join(f"{lead:+.1f} points at {int(s):,}" for s, lead in transfer_lead(d).items())


def fine_tuned_best(d: dict) -> str:
    from training.limited_data import TRANSFER

    for s in SIZES:
        assert max(TRANSFER, key=lambda a: d["summary"][a][s]["mean"]) == "pretrained", s
    return "is the best transfer arm at every size"


def paired(d: dict, arm: str) -> dict[str, tuple[float, float]]:
    """Per size: the method minus the small CNN on the same seed, mean and sample sd, in points."""
    out = {}
    for s in SIZES:
        a = {r["seed"]: r["accuracy"] for r in d["runs"][arm][s]}
        b = {r["seed"]: r["accuracy"] for r in d["runs"]["small-cnn"][s]}
        diffs = [100 * (a[k] - b[k]) for k in sorted(a.keys() & b.keys())]
        out[s] = (statistics.mean(diffs), statistics.stdev(diffs))
    return out


def points(d: dict, arm: str, sizes: tuple[str, ...]) -> str:
    return ", ".join(f"{paired(d, arm)[s][0]:+.1f}" for s in sizes)


def small_cnn_methods(d: dict) -> str:
    """The fresh run's reading of the methods, each sign the words rely on asserted."""
    no_aug, rot, fix = paired(d, "no-augmentation"), paired(d, "rotation-ssl"), paired(d, "fixmatch")
    assert all(no_aug[s][0] > 0 for s in SIZES)
    assert all(rot[s][0] > 0 for s in SIZES[:3]) and abs(rot["10000"][0]) < rot["10000"][1]
    assert all(fix[s][0] > 0 for s in SIZES[:2]) and all(fix[s][0] < 0 for s in SIZES[2:])
    return (f"training without augmentation is ahead of the main job's augmentation at every size "
            f"({points(d, 'no-augmentation', SIZES)} points), rotation pre-training from 300 to 3,000 labels "
            f"({points(d, 'rotation-ssl', SIZES[:3])}; level at 10,000, {points(d, 'rotation-ssl', SIZES[3:])}), "
            f"FixMatch at 300 and 1,000 ({points(d, 'fixmatch', SIZES[:2])}); FixMatch is behind from 3,000 on "
            f"({points(d, 'fixmatch', SIZES[2:])})")  # fmt: skip


def nothing_gained(d: dict) -> str:
    for arm in ("pseudo-label", "active"):
        assert all(mean < sd for mean, sd in paired(d, arm).values()), arm
    return "Pseudo-labels and active learning gain nothing beyond their seeds' spread at any size"


def earlier_run(d: dict) -> str:
    """The several-sittings run against the one-sitting one: the lead, the slower backbone's rate, two methods."""
    from tests.doc_figures.common import results

    fresh = results(LIMITED_FAIR)
    lead = transfer_lead(d)
    assert all(x > 0 for x in lead.values())
    no_aug, rot = paired(d, "no-augmentation"), paired(d, "rotation-ssl")
    assert abs(no_aug["300"][0]) < no_aug["300"][1]
    assert rot["1000"][0] > rot["1000"][1] and all(abs(rot[s][0]) < rot[s][1] for s in SIZES if s != "1000")
    return (f"found transfer learning ahead at every size ({lead['300']:+.1f} to {lead['10000']:+.1f} points) "
            f"and the same FixMatch pattern. Its slower-backbone arm tuned to another rate "
            f"({d['tuned']['slow-backbone']['lr']:g} against this run's {fresh['tuned']['slow-backbone']['lr']:g}), "
            f"and its small-CNN methods moved by other amounts: there, training without augmentation was level "
            f"at 300 labels ({no_aug['300'][0]:+.1f} points) and rotation pre-training helped only at 1,000 "
            f"({rot['1000'][0]:+.1f})")  # fmt: skip


def pretrained_cpu(d: dict) -> str:
    return f"{next(r for r in d['runs']['pretrained']['10000'] if r['seed'] == 0)['cpu_seconds']} CPU seconds"


def one_sitting(d: dict) -> str:
    assert not d["resumed"] and not d["missing"]
    return f"{d['minutes']} minutes of wall-clock time and {d['cpu_minutes']} CPU minutes in one sitting"


FIGURES += [
    Figure("docs/training.md", LIMITED_FAIR, limited_fair_table, "fair limited data: table"),
    Figure("docs/training.md", LIMITED_FAIR, limited_fair_gap, "fair limited data: transfer's lead"),
    Figure("docs/training.md", LIMITED_FAIR, fine_tuned_best, "fair limited data: the best transfer arm"),
    Figure("docs/training.md", LIMITED_FAIR, lambda d: (
        f"the small CNN trained without augmentation ({cell(d, 'no-augmentation', '10000')}) is level with the best "
        f"fine-tuned EfficientNet ({cell(d, 'pretrained', '10000')})"), "fair limited data: level at 10,000"),
    Figure("docs/training.md", LIMITED_FAIR, small_cnn_methods, "fair limited data: the small CNN's methods"),
    Figure("docs/training.md", LIMITED_FAIR, nothing_gained, "fair limited data: pseudo-labels and active learning"),
    Figure("docs/training.md", LIMITED_SITTINGS, earlier_run, "fair limited data: the earlier run"),
    Figure("docs/training.md", LIMITED_FAIR, one_sitting, "fair limited data: cost"),
    Figure("docs/training.md", LIMITED_FAIR, lambda d: (
        f"The cells' CPU seconds add up to {cells_cpu_minutes(d):.0f} CPU minutes, {cells_cpu_minutes(d) / 2:.0f} "
        "minutes of two cores"), "fair limited data: the cells' CPU"),
    Figure("docs/training.md", LIMITED_SITTINGS, lambda d: (
        f"{d['minutes']:.0f} minutes of wall-clock time and {d['cpu_minutes']:.0f} CPU minutes over its sittings; "
        f"its cells alone came to about {cells_cpu_minutes(d) / 2:.0f} minutes of two cores"),
        "fair limited data: the earlier run's cost"),
    Figure("docs/training.md", LIMITED_SITTINGS, lambda d: f"took {pretrained_cpu(d)} in the earlier run",
           "fair limited data: a fine-tune before channels-last"),
    Figure("docs/training.md", LIMITED_FAIR, lambda d: f"{pretrained_cpu(d)} in this one",
           "fair limited data: a fine-tune in channels-last"),
    Figure("docs/training.md", LIMITED_FAIR, lambda d: (
        "FixMatch ({:.0f} of the {:.0f} CPU minutes)".format(
            sum(r["cpu_seconds"] for rs in d["runs"]["fixmatch"].values() for r in rs) / 60, cells_cpu_minutes(d))),
        "fair limited data: the dearest arm"),
    Figure("docs/deployment-answers.md", LIMITED_FAIR, lambda d: (
        f"in one sitting of {d['minutes']} minutes on 2 cores, AMD EPYC): transfer learning ahead of the small CNN "
        f"at every size, by less as labels grow ({transfer_lead(d)['300']:+.1f} points at 300 labels, "
        f"{transfer_lead(d)['10000']:+.1f} at 10,000)"), "fair limited data: the answer's row"),
]  # fmt: skip
