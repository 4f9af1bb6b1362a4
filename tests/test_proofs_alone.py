"""The sample of cited proofs that `make test` runs alone (tests/proofs_alone.py), and the breaks that
`make mutation-check` applies to them (tests/mutation_check.py). Kept out of
tests/test_docs.py, which tests/proofs_alone.py imports to read the cited proofs: no import circle."""

from __future__ import annotations

import datetime

from tests import proofs_alone


def test_proofs_alone_sample_covers_every_cited_proof_over_time():
    """`make test` runs the always-run proofs and one more alone, picked by date: over as many days as there
    are cited proofs, every one has had its turn (tests/proofs_alone.py)."""
    cited = proofs_alone.cited()
    assert set(proofs_alone.ALWAYS) <= set(cited)
    day = datetime.date(2026, 1, 1)
    seen = {t for k in range(len(cited)) for t in proofs_alone.sample(cited, 1, day + datetime.timedelta(days=k))}
    assert seen == set(cited)


def test_every_mutation_still_applies_to_the_code_and_runs_cited_proofs():
    """`make mutation-check` (tests/mutation_check.py) stays in step with the code: each break's text is
    found exactly once where it is applied, and the tests it runs are proofs the docs cite."""
    from tests import mutation_check

    cited = set(proofs_alone.cited())
    for m in mutation_check.MUTATIONS:
        assert (mutation_check.ROOT / m.path).read_text().count(m.old) == 1, (m.name, m.path)
        assert m.old != m.new and set(m.tests) <= cited, (m.name, set(m.tests) - cited)
    assert len({m.name for m in mutation_check.MUTATIONS}) == len(mutation_check.MUTATIONS)


def test_reliability_md_quotes_the_last_mutation_result():
    """docs/reliability.md's table of the mutation check is the one its results file renders: a break run
    since, or a changed break, shows as a stale page (`python -m tests.mutation_check --table`)."""
    import json

    from tests import mutation_check

    record = json.loads(mutation_check.RESULT.read_text())
    stale = {r["name"] for r in record["results"]} - {r["name"] for r in mutation_check.merged(record, [])["results"]}
    assert record == mutation_check.merged(record, []), f"changed since their run: `--only {' '.join(sorted(stale))}`"
    page = (mutation_check.ROOT / "docs" / "reliability.md").read_text()
    assert mutation_check.markdown(record) in page, "reliability.md: paste `python -m tests.mutation_check --table`"


def test_a_run_of_some_breaks_keeps_the_others_last_results():
    """A run of some breaks replaces their rows only; a run without a verdict keeps the earlier verdict, and a
    row recorded against another definition of its break is dropped (the page claims no more than was run)."""
    from tests import mutation_check as mc

    first, second = mc.MUTATIONS[:2]
    row = lambda m, outcome, commit: {"name": m.name, "outcome": outcome, "commit": commit,  # noqa: E731
                                      "definition": mc.definition(m)}  # fmt: skip
    previous = mc.merged({}, [row(first, "killed", "a"), row(second, "killed", "a")])
    assert (previous["run"], previous["killed"], previous["complete"]) == (2, 2, False)
    now = mc.merged(previous, [row(second, "survived", "b")])
    assert [(r["name"], r["commit"], r["outcome"]) for r in now["results"]] == [
        (first.name, "a", "killed"), (second.name, "b", "survived")]  # fmt: skip
    assert mc.merged(now, [row(first, "interrupted", "c")])["results"][0]["commit"] == "a"
    changed = {**previous, "results": [{**previous["results"][0], "definition": {"tests": []}}]}
    assert [r["name"] for r in mc.merged(changed, [])["results"]] == []
