"""Text data and per-domain metrics without training: the bundled domains, the split, user files, by_domain."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
from pydantic import ValidationError
from pydantic_settings import CliApp

from servable.config import TextTrainConfig
from tests.conftest import ROOT
from training.data_text import OOD_DOMAIN, SOURCES, TRAIN_DOMAINS, _hutto, load_bundled, load_user_file, normalise
from training.metrics import by_domain, domain_table
from training.text_levers import class_balance, fit_threshold, loss_weights, threshold_report

DATASETS = ROOT / ".cache" / "datasets"


@pytest.fixture(scope="module")
def bundled():
    return load_bundled(DATASETS, seed=42, val_fraction=0.1)


def _strata(splits, name: str) -> Counter:
    return Counter(zip(splits.domains[name], (label for _, label in getattr(splits, name)), strict=True))


def test_the_split_keeps_every_domain_in_train_val_and_test_with_its_label_balance(bundled):
    """Stratified by domain and label: each domain's share of val and test is the asked fraction of that
    domain, and each domain's positive share is the same in train, val and test."""
    assert set(TRAIN_DOMAINS) == {"movies", "tweets", "editorials"}
    for name in ("train", "val", "test", "ood_test"):
        assert len(bundled.domains[name]) == len(getattr(bundled, name))
    counts = bundled.counts_by_domain()
    assert set(counts) == {*TRAIN_DOMAINS, OOD_DOMAIN}
    strata = {name: _strata(bundled, name) for name in ("train", "val", "test")}
    for domain in TRAIN_DOMAINS:
        total = sum(counts[domain].values())
        assert total > 2500, (domain, total)
        assert counts[domain]["test"] == pytest.approx(0.15 * total, abs=2)
        assert counts[domain]["val"] == pytest.approx(0.10 * total, abs=2)
        shares = {name: s[(domain, 1)] / (s[(domain, 0)] + s[(domain, 1)]) for name, s in strata.items()}
        assert max(shares.values()) - min(shares.values()) < 0.005, (domain, shares)
    # the domains really differ in balance (tweets mostly positive, editorials mostly negative): pooled
    # stratification by label alone would not have kept each one's
    assert strata["train"][("tweets", 1)] > 2 * strata["train"][("tweets", 0)]
    assert strata["train"][("editorials", 0)] > strata["train"][("editorials", 1)]
    texts = [normalise(t) for name in ("train", "val", "test") for t, _ in getattr(bundled, name)]
    assert len(texts) == len(set(texts))  # de-duplicated across domains and splits


def test_no_amazon_sentence_is_trained_on_and_amazon_is_the_whole_out_of_domain_set(bundled):
    """The out-of-domain set is Amazon's file less the few generic sentences that the other domains hold too
    (today 5, like "Wrong." or "Don't waste your money."): they stay in their own domain and leave the
    Amazon set, so no out-of-domain test sentence is ever trained on, validated or tested in-domain."""
    amazon = {normalise(t) for t, _ in _hutto(DATASETS, [SOURCES["hutto_amazon"][1]])["amazonReviewSnippets"]} - {""}
    assert len(amazon) > 2900
    seen = {normalise(t) for name in ("train", "val", "test") for t, _ in getattr(bundled, name)}
    shared = amazon & seen
    assert len(shared) < 10 and all(len(text.split()) <= 5 for text in shared), shared
    ood = {normalise(t) for t, _ in bundled.ood_test}
    assert set(bundled.domains["ood_test"]) == {OOD_DOMAIN} and len(ood) == len(bundled.ood_test) > 2900
    assert ood == amazon - shared
    assert not ood & seen
    by_source = bundled.provenance["counts_by_source"]
    amazon_counts = by_source["hutto_amazon"]
    assert amazon_counts["domain"] == OOD_DOMAIN and amazon_counts["used"] == len(bundled.ood_test)
    assert sum(s["used"] for s in by_source.values() if s["domain"] != OOD_DOMAIN) == sum(
        len(getattr(bundled, name)) for name in ("train", "val", "test")
    )


def test_the_movie_only_recipe_is_one_setting_away_and_tests_on_the_same_movie_sentences(bundled):
    """--domains movies: only movie reviews, and (each domain drawing its own split) exactly the movie test
    sentences and Amazon set of the default, so the two recipes compare on equal terms."""
    cfg = CliApp.run(TextTrainConfig, cli_args=["--domains", "movies"])
    assert cfg.domains == ["movies"] and TextTrainConfig().domains == list(TRAIN_DOMAINS)
    movies = load_bundled(DATASETS, seed=42, val_fraction=0.1, domains=cfg.domains)
    assert set(movies.counts_by_domain()) == {"movies", OOD_DOMAIN}
    movie_test = {row for row, d in zip(bundled.test, bundled.domains["test"], strict=True) if d == "movies"}
    assert set(movies.test) == movie_test
    assert movies.ood_test == bundled.ood_test
    assert movies.provenance["domains"] == ["movies"]
    with pytest.raises(ValidationError):
        TextTrainConfig(domains=[OOD_DOMAIN])


def test_by_domain_counts_the_two_kinds_of_error():
    """A hand-made case: false_positive = a negative text called positive, false_negative the reverse."""
    labels = ["negative", "positive"]
    y_true = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    y_pred = np.array([1, 1, 0, 1, 0, 1, 0, 1])
    domains = ["hotels", "hotels", "hotels", "hotels", "hotels", "news", "news", "news"]
    assert by_domain(y_true, y_pred, domains, labels, in_domain=True) == {
        "hotels": {"n": 5, "accuracy": 0.4, "false_positive": 2, "false_negative": 1, "in_domain": True},
        "news": {"n": 3, "accuracy": 1.0, "false_positive": 0, "false_negative": 0, "in_domain": True},
    }
    # label order does not matter, only the names; a label set without both has no polarity
    flipped = by_domain(1 - y_true, 1 - y_pred, domains, ["positive", "negative"], in_domain=False)
    assert flipped["hotels"] == {"n": 5, "accuracy": 0.4, "false_positive": 2, "false_negative": 1, "in_domain": False}
    other = by_domain(y_true, y_pred, domains, ["bad", "good"], in_domain=True)["hotels"]
    assert other["false_positive"] is None and other["false_negative"] is None and other["accuracy"] == 0.4
    lines = domain_table({"fp32": by_domain(y_true, y_pred, domains, labels, True)})
    assert lines[1].split() == ["fp32", "hotels", "in-domain", "5", "0.4000", "2", "1"]


def _reviews(domains: bool) -> list[dict]:
    rows = []
    for i in range(48):
        row = {"text": f"{'loved' if i % 2 else 'hated'} it, take {i}", "label": "pos" if i % 2 else "neg"}
        if domains:
            row["domain"] = ("hotels", "films", "")[i % 3]  # an empty cell: the file's own domain
        rows.append(row)
    return rows


def _write_csv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_user_file_with_a_domain_column_keeps_each_domain_in_every_split(tmp_path, suffix):
    path = tmp_path / f"shop{suffix}"
    rows = _reviews(domains=True)
    if suffix == ".csv":
        _write_csv(path, rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    splits = load_user_file(path, seed=3, val_fraction=0.2)
    assert splits.labels == ["neg", "pos"] and splits.provenance["domains"] == ["films", "hotels", "shop"]
    for name in ("train", "val", "test"):
        strata = _strata(splits, name)
        assert {d for d, _ in strata} == {"films", "hotels", "shop"}, name
        assert all(strata[(d, 0)] == strata[(d, 1)] for d, _ in strata), (name, strata)  # 8 of each label
    for name in ("train", "val", "test"):
        for (text, _), domain in zip(getattr(splits, name), splits.domains[name], strict=True):
            take = int(text.rsplit(" ", 1)[1])
            assert domain == ("hotels", "films", "shop")[take % 3]
    assert splits.ood_test == [] and splits.domains["ood_test"] == []


def test_a_user_file_without_a_domain_column_is_one_domain_named_after_the_file(tmp_path):
    path = tmp_path / "reviews.csv"
    _write_csv(path, _reviews(domains=False))
    splits = load_user_file(path, seed=0, val_fraction=0.1)
    assert splits.counts_by_domain() == {"reviews": {"train": 36, "val": 4, "test": 8}}
    report = by_domain(np.array([1, 0]), np.array([1, 1]), ["reviews"] * 2, splits.labels, in_domain=True)
    assert report["reviews"]["false_positive"] is None  # neg/pos are not the names positive/negative


def test_any_domain_can_be_held_out_and_is_then_never_trained_on(bundled):
    """--held-out editorials: leave-one-domain-out. The other three domains (Amazon among them) train and
    test in-domain; every editorial sentence is the out-of-domain set, and none is trained on."""
    cfg = CliApp.run(TextTrainConfig, cli_args=["--held-out", "editorials"])
    assert cfg.domains == ["movies", "tweets", "amazon"] and TextTrainConfig().held_out == OOD_DOMAIN
    loo = load_bundled(DATASETS, seed=42, val_fraction=0.1, domains=cfg.domains, held_out=cfg.held_out)
    counts = loo.counts_by_domain()
    assert counts["editorials"] == {"ood_test": len(loo.ood_test)} and len(loo.ood_test) > 2500
    assert set(counts["amazon"]) == {"train", "val", "test"} and counts["amazon"]["test"] > 400
    seen = {normalise(t) for name in ("train", "val", "test") for t, _ in getattr(loo, name)}
    assert not seen & {normalise(t) for t, _ in loo.ood_test}
    assert loo.provenance["ood_domain"] == "editorials" and loo.provenance["domains"] == cfg.domains
    # the editorials held out are the ones the default trains and tests on (less the few shared sentences)
    editorials = {normalise(t) for name in ("train", "val", "test") for (t, _), d in
                  zip(getattr(bundled, name), bundled.domains[name], strict=True) if d == "editorials"}  # fmt: skip
    assert len(editorials ^ {normalise(t) for t, _ in loo.ood_test}) < 20
    with pytest.raises(ValidationError, match="held-out"):
        TextTrainConfig(held_out="movies", domains=["movies", "tweets"])


def test_domain_class_loss_weights_give_every_domain_and_label_the_same_total_weight():
    """The class-balanced loss (--class-weights): `class` evens the labels, `domain-class` each (domain, label)
    pair; the weights average 1 so the learning rate means the same; `none` leaves the loss unweighted."""
    labels = [1, 1, 1, 0, 1, 0, 0, 0, 0, 1]
    domains = ["tweets"] * 4 + ["news"] * 6  # tweets 3 positive / 1 negative, news 2 / 4
    assert loss_weights(labels, domains, "none") is None
    for mode, keys in (("class", labels), ("domain-class", list(zip(domains, labels, strict=True)))):
        w = loss_weights(labels, domains, mode)
        assert w.mean() == pytest.approx(1.0)
        totals = Counter()
        for k, wi in zip(keys, w, strict=True):
            totals[k] += wi
        assert len(set(np.round(list(totals.values()), 6))) == 1, (mode, totals)
    assert loss_weights(labels, domains, "domain-class")[3] == pytest.approx(10 / 4)  # the one negative tweet


def test_a_threshold_fitted_on_labelled_sentences_fixes_a_negative_bias():
    """A model that calls positive sentences negative (P(positive) 0.3-0.45 for them): the cut fitted on the
    validation split stays at 0.5 where the top class is already right, the held-out domain's cut fitted on a
    labelled sample moves below 0.5 and turns its false negatives into right answers on the rest."""
    rng = np.random.default_rng(0)

    def logits(p):  # two-class logits with P(positive) = p
        return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)

    y_val = np.array([0, 1] * 50)
    p_val = np.where(y_val == 1, rng.uniform(0.6, 0.9, 100), rng.uniform(0.1, 0.4, 100))
    y_ood = np.array([0, 1] * 300)
    p_ood = np.where(y_ood == 1, rng.uniform(0.3, 0.45, 600), rng.uniform(0.05, 0.25, 600))
    sets = {"val": (logits(p_val), y_val, ["news"] * 100), "test": (logits(p_val), y_val, ["news"] * 100),
            "ood": (logits(p_ood), y_ood, ["shops"] * 600)}  # fmt: skip
    report = threshold_report(sets, ["negative", "positive"], sample=100, seed=0)
    assert report["validation"]["threshold"] == 0.5
    assert report["per_domain"]["news"]["fitted"]["accuracy"] == 1.0
    shops = report["validation"]["domains"]["shops"]["argmax"]
    assert shops == {"n": 600, "accuracy": 0.5, "false_positive": 0, "false_negative": 300}
    held = report["held_out"]
    assert held["domain"] == "shops" and held["fitted_on"] == 100 and 0.25 < held["threshold"] < 0.3
    assert held["argmax"]["n"] == held["fitted"]["n"] == 500 and held["argmax"]["false_negative"] > 200
    assert held["fitted"] == {"n": 500, "accuracy": 1.0, "false_positive": 0, "false_negative": 0}
    assert threshold_report(sets, ["bad", "good"], 100, 0) is None  # no polarity, no threshold
    assert fit_threshold(np.array([0.2, 0.8]), np.array([False, True])) == 0.5  # ties: the plain answer


def test_the_class_balance_is_counted_per_domain_and_split(bundled):
    balance = class_balance(bundled)
    for split in ("train", "val", "test"):
        strata = _strata(bundled, split)
        for dom in TRAIN_DOMAINS:
            n = strata[(dom, 0)] + strata[(dom, 1)]
            assert balance[dom][split] == {"n": n, "positive_share": round(strata[(dom, 1)] / n, 4)}
    assert balance[OOD_DOMAIN]["ood_test"]["n"] == len(bundled.ood_test)
