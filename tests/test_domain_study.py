"""The text domain-transfer study (training/domain_study.py): its cells on a tiny setting (a two-layer BERT with
the bundled tokenizer, a few hundred real sentences, seconds), resumability, and that the selection arm is the
labelling loop's selection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from servable.config import DomainStudyConfig
from training import domain_study
from training.domain_study import all_cells, cell_key, loop_selection, progress_path, random_selection, run_study


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    """A randomly initialised two-layer BERT with MiniLM's tokenizer: real training code, seconds per run."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from training.text_model import bundled_backbone

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(bundled_backbone())
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64)  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def tiny(tmp_path, backbone: str, **update) -> DomainStudyConfig:
    fields = dict(
        backbone=backbone, held_out_domains=["amazon"], seeds=[0], labels_added=[0, 20], base_limit=120,
        base_val_limit=40, candidate_pool=80, adapt_val_limit=40, test_limit=60, forgetting_limit=30,
        adapt_min_steps=2, batch_size=16, progress=False, num_threads=1, jobs=1,
        runs_dir=tmp_path / "runs", output=tmp_path / "out",
    )  # fmt: skip
    return DomainStudyConfig(**(fields | update))


def test_the_loop_selection_is_balanced_uncertainty():
    """Each predicted class in turn (the class with fewer candidates first), the least confident first."""
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.51, 0.49], [0.05, 0.95]])
    # predicted negative: 0 (0.9), 1 (0.55), 4 (0.7), 5 (0.51); predicted positive: 2 (0.8), 3 (0.6), 6 (0.95)
    assert loop_selection(probs, ["negative", "positive"], 4).tolist() == [3, 5, 2, 1]
    assert loop_selection(probs, ["negative", "positive"], 0).tolist() == []


def test_random_selection_is_a_seeded_nested_draw():
    a, b = random_selection(100, 50, 0, "amazon"), random_selection(100, 20, 0, "amazon")
    assert len(set(a)) == 50 and a[:20].tolist() == b.tolist()
    assert random_selection(100, 20, 1, "amazon").tolist() != b.tolist()


def test_cells_seed_by_seed_with_one_base_cell_per_domain_and_seed():
    cfg = DomainStudyConfig(held_out_domains=["amazon", "movies"], seeds=[0, 1], labels_added=[0, 50])
    cells = all_cells(cfg)
    assert cells[:3] == [("amazon", 0, "base", 0), ("amazon", 0, "random", 50), ("amazon", 0, "active", 50)]
    assert len(cells) == 2 * 2 * 3 and [c[1] for c in cells] == [0] * 6 + [1] * 6


def test_tiny_study_end_to_end_and_the_active_arm_uses_the_loop_selection(tmp_path, tiny_backbone):
    """Every cell of a tiny study: accuracy on the held-out domain's test split, the base domains' accuracy, the
    chosen labels; the JSON, table and plot; the active arm's labels are the loop's choice from the base model's
    scores, the random arm's the seeded draw."""
    cfg = tiny(tmp_path, tiny_backbone)
    results = run_study(cfg)
    on_disk = json.loads((cfg.output / "domain_study.json").read_text())
    assert on_disk["missing"] == [] and len(on_disk["cells"]) == 3 and on_disk["machine"] and on_disk["command"]
    by_arm = {c["arm"]: c for c in results["cells"]}
    for cell in by_arm.values():
        assert 0 <= cell["accuracy"] <= 1 and 0 <= cell["base_domains_accuracy"] <= 1
    assert by_arm["random"]["replayed"] == 10 and by_arm["random"]["epochs_run"] >= 1
    assert set(results["summary"]["amazon"]) == {"random", "active"}
    assert (cfg.output / "domain_study.png").stat().st_size > 10_000
    assert "amazon held out" in (cfg.output / "domain_study.md").read_text()
    base = json.loads((domain_study.base_dir(cfg, "amazon", 0) / "base.json").read_text())
    data = domain_study.load_domain(cfg, "amazon")
    chosen = loop_selection(np.array(base["pool_probs"]), data.base.labels, 20)
    positives = np.mean([data.pool[i][1] for i in chosen])
    assert by_arm["active"]["chosen_positive_share"] == pytest.approx(positives)
    drawn = np.mean([data.pool[i][1] for i in random_selection(len(data.pool), 20, 0, "amazon")])
    assert by_arm["random"]["chosen_positive_share"] == pytest.approx(drawn)


def test_the_active_arm_trains_on_the_loop_selection(tmp_path, tiny_backbone, monkeypatch):
    """The sentences the active arm adapts on are exactly those the loop's `balanced` selection puts on a sheet
    (a selection broken to a random draw fails here)."""
    cfg = tiny(tmp_path, tiny_backbone)
    seen = {}
    real_adapt = domain_study.adapt

    def spy(cfg_, data, seed, chosen, k):
        seen[(data.domain, k, tuple(chosen))] = [data.pool[i] for i in chosen]
        return real_adapt(cfg_, data, seed, chosen, k)

    monkeypatch.setattr(domain_study, "adapt", spy)
    run_study(cfg.model_copy(update={"labels_added": [0]}))  # the base model and its scores
    base = json.loads((domain_study.base_dir(cfg, "amazon", 0) / "base.json").read_text())
    data = domain_study.load_domain(cfg, "amazon")
    probs = np.array(base["pool_probs"])
    monkeypatch.setattr(domain_study, "all_cells", lambda c: [("amazon", 0, "active", 20)])
    run_study(cfg)
    ((_, k, chosen),) = seen
    assert k == 20
    top1, predicted = probs.max(1), probs.argmax(1)
    expected = []  # balanced uncertainty, written out: classes in turn, fewer candidates first, least sure first
    queues = sorted(([i for i in np.argsort(top1, kind="stable") if predicted[i] == c] for c in set(predicted)),
                    key=lambda q: (len(q), data.base.labels[predicted[q[0]]]))  # fmt: skip
    while len(expected) < k:
        for q in queues:
            if q and len(expected) < k:
                expected.append(int(q.pop(0)))
    assert list(chosen) == expected


def test_a_stopped_study_resumes_without_recomputing_done_cells(tmp_path, tiny_backbone, monkeypatch):
    cfg = tiny(tmp_path, tiny_backbone)
    ran: list[str] = []
    real_cell = domain_study.run_cell

    def counting(cfg_, data, base, seed, arm, k):
        ran.append(cell_key(data.domain, seed, arm, k))
        if len(ran) == 2 and stop["now"]:
            raise KeyboardInterrupt  # killed in the second cell
        return real_cell(cfg_, data, base, seed, arm, k)

    stop = {"now": True}
    monkeypatch.setattr(domain_study, "run_cell", counting)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg)
    saved = json.loads(progress_path(cfg).read_text())
    assert list(saved["cells"]) == ["amazon|0|base|0"]
    partial = json.loads((cfg.output / "domain_study.json").read_text())
    assert partial["missing"] == ["amazon|0|random|20", "amazon|0|active|20"]
    base_json = domain_study.base_dir(cfg, "amazon", 0) / "base.json"
    trained_at = base_json.stat().st_mtime_ns
    stop["now"], ran[:] = False, []
    results = run_study(cfg)
    assert ran == ["amazon|0|random|20", "amazon|0|active|20"]  # the done cell is not run again
    assert base_json.stat().st_mtime_ns == trained_at  # nor the cached base model trained again
    assert results["missing"] == [] and len(results["cells"]) == 3


def test_adaptations_wait_for_their_base_and_the_bases_start_each_seed():
    assert domain_study.ready(("amazon", 0, "base", 0), {})
    assert not domain_study.ready(("amazon", 0, "random", 50), {"movies|0": {}, "amazon|1": {}})
    assert domain_study.ready(("amazon", 0, "random", 50), {"amazon|0": {}})
    cfg = DomainStudyConfig(held_out_domains=["amazon", "movies"], seeds=[0, 1], labels_added=[0, 50, 200])
    order = domain_study.start_order(all_cells(cfg))
    assert order[:4] == [("amazon", 0, "base", 0), ("movies", 0, "base", 0), ("amazon", 0, "random", 200),
                         ("amazon", 0, "active", 200)]  # fmt: skip
    assert [c[1] for c in order] == [0] * 10 + [1] * 10


def test_cells_in_parallel_processes_give_what_one_process_gives(tmp_path, tiny_backbone):
    """Two worker processes of one thread each, against the same study run cell after cell in this process with
    one thread: the same accuracy, errors and chosen labels in every cell (each cell seeds itself and reads
    only its base)."""
    alone = run_study(tiny(tmp_path / "alone", tiny_backbone, labels_added=[0, 20, 40]))
    side_by_side = run_study(tiny(tmp_path / "parallel", tiny_backbone, labels_added=[0, 20, 40], jobs=2))
    keep = ("domain", "seed", "arm", "k", "accuracy", "false_positive", "false_negative", "base_domains_accuracy",
            "chosen_positive_share", "epochs_run", "best_epoch")  # fmt: skip
    cells = lambda r: sorted(({k: c.get(k) for k in keep} for c in r["cells"]), key=str)  # noqa: E731
    assert len(side_by_side["cells"]) == 5 and side_by_side["missing"] == []
    assert cells(side_by_side) == cells(alone)
    assert side_by_side["bases"] and [b["best_val_acc"] for b in side_by_side["bases"].values()] == [
        b["best_val_acc"] for b in alone["bases"].values()]  # fmt: skip


def test_the_text_card_shows_the_study_headline_when_its_results_are_there(tmp_path, monkeypatch):
    from servable.artifact import ModelManifest
    from training import model_card

    cell = lambda mean: {"mean": mean, "sd": 0.01, "n": 3}  # noqa: E731
    results = {"config": {"seeds": [0, 1, 2]}, "machine": "AMD EPYC, 2 cores", "missing": [],
               "summary": {"amazon": {"random": {"0": cell(0.8123), "1000": cell(0.8567)},
                                      "active": {"0": cell(0.8123), "1000": cell(0.8721)}}}}  # fmt: skip
    manifest = ModelManifest(name="sentiment-bert", version="v1", task="text-classification",
                             labels=["negative", "positive"], onnx={"fp32": "model.onnx"},
                             training_config={"data_file": None}, metrics={"test": {"fp32": {"accuracy": 0.9}}},
                             provenance={}, versions={})  # fmt: skip
    monkeypatch.setattr(model_card, "DOMAIN_STUDY", tmp_path / "domain_study.json")
    assert "make domain-study" not in model_card.render_model_card(manifest)  # no results: no line, a card all the same
    model_card.DOMAIN_STUDY.write_text(json.dumps(results))
    card = model_card.render_model_card(manifest)
    assert "amazon 0.812 with none; 1,000: 0.857 at random, 0.872 by the loop" in card and "AMD EPYC" in card
    user_data = manifest.model_copy(update={"training_config": {"data_file": "reviews.csv"}})
    assert "make domain-study" not in model_card.render_model_card(user_data)  # the study is of the bundled domains
