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
