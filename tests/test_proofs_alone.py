"""The sample of cited proofs that `make test` runs alone (tests/proofs_alone.py). Kept out of
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
