"""The in-process adaptive batcher (serving/batcher.py): its behaviour pinned without a server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.batcher import LATE_CAP, BatchCost, Batcher, BatchFailed, QueueTimeout, WouldBeLate


class Model:
    """Row i -> [i, 2i]; records each batch; sleeps `delay` per batch; raises on a poisoned row."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.batches, self.threads = delay, [], set()

    def __call__(self, rows: list) -> np.ndarray:
        self.batches.append(list(rows))
        self.threads.add(threading.current_thread().name)
        if any(r == "poison" for r in rows):
            raise ValueError("bad row")
        time.sleep(self.delay)
        return np.array([[r, 2 * r] for r in rows], dtype=np.float64)


def test_concurrent_callers_each_get_their_own_rows_and_batches_form():
    model = Model(delay=0.02)

    async def main():
        batcher = Batcher(model, max_batch_size=16, max_wait_s=5)
        calls = [list(range(10 * i, 10 * i + 1 + i % 3)) for i in range(40)]  # 1 to 3 rows each
        outs = await asyncio.gather(*(batcher.submit(rows) for rows in calls))
        return calls, outs

    calls, outs = asyncio.run(main())
    for rows, out in zip(calls, outs, strict=True):
        np.testing.assert_array_equal(out.values, [[r, 2 * r] for r in rows])
    assert sum(len(b) for b in model.batches) == sum(len(c) for c in calls)  # each row ran exactly once
    assert len(model.batches) < len(calls) / 3, "concurrent calls were not batched"
    assert max(len(b) for b in model.batches) <= 16
    assert all(name.startswith("model") for name in model.threads)  # off the event loop


def test_a_lone_caller_is_not_delayed_by_a_batching_window():
    model = Model()

    async def main() -> list[float]:
        batcher = Batcher(model, max_batch_size=32, max_wait_s=5)
        await batcher.submit([0])  # start the worker and the model thread
        took = []
        for i in range(50):
            start = time.perf_counter()
            await batcher.submit([i])
            took.append(time.perf_counter() - start)
        return took

    took = asyncio.run(main())
    assert np.median(took) < 0.002, f"median {1000 * np.median(took):.2f} ms for a model that takes ~0 ms"
    assert all(len(b) == 1 for b in model.batches)


def test_a_failing_batch_fails_only_its_callers_and_the_batcher_keeps_serving():
    model = Model(delay=0.05)

    async def main():
        batcher = Batcher(model, max_batch_size=2, max_wait_s=5)
        first = asyncio.ensure_future(batcher.submit([1]))  # runs alone while the next ones queue
        await asyncio.sleep(0.01)
        # Queued behind it: [poison, 2] form one batch of 2, [3, 4] the next.
        bad = asyncio.ensure_future(batcher.submit(["poison"]))
        mate = asyncio.ensure_future(batcher.submit([2]))
        later = asyncio.ensure_future(batcher.submit([3, 4]))
        results = await asyncio.gather(first, bad, mate, later, return_exceptions=True)
        after = await batcher.submit([5])
        return results, after

    (first, bad, mate, later), after = asyncio.run(main())
    np.testing.assert_array_equal(first.values, [[1, 2]])
    assert isinstance(bad, BatchFailed) and isinstance(mate, BatchFailed)  # the poisoned batch only
    np.testing.assert_array_equal(later.values, [[3, 6], [4, 8]])
    np.testing.assert_array_equal(after.values, [[5, 10]])
    assert "ValueError" in str(bad) and "bad row" not in str(bad)  # the type, never the input


def test_calls_that_waited_past_the_bound_are_refused_not_run_late():
    model = Model(delay=0.2)

    async def main():
        batcher = Batcher(model, max_batch_size=1, max_wait_s=0.05)
        first = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(batcher.submit([2]))
        return await asyncio.gather(first, waiting, return_exceptions=True)

    first, waiting = asyncio.run(main())
    np.testing.assert_array_equal(first.values, [[1, 2]])
    assert isinstance(waiting, QueueTimeout)
    assert model.batches == [[1]]


def test_a_call_its_batch_would_answer_late_is_refused_when_the_batch_forms_and_its_mates_run():
    """The running batch takes four times what the warm-up predicted, so a call admitted on that prediction
    cannot be answered by its deadline any more: it is refused when its batch forms (a 503), not run late,
    and its batch-mate with time to spare runs without it."""
    model = Model(delay=0.2)

    async def main():
        batcher = Batcher(model, max_batch_size=4, max_wait_s=5)
        batcher.seed([(1, 0.05)])  # the warm-up found 50 ms a row; every batch here takes 200 ms
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        # predicted at admission: ~40 ms of the running batch and 100 ms for a 2-row batch: admitted
        tight = asyncio.ensure_future(batcher.submit([2], deadline=start + 0.25))
        spare = asyncio.ensure_future(batcher.submit([3], deadline=start + 5))
        tight_answer = await asyncio.gather(tight, return_exceptions=True)
        refused_after = time.perf_counter() - start
        return await running, tight_answer[0], refused_after, await spare

    first, tight, refused_after, spare = asyncio.run(main())
    assert isinstance(tight, QueueTimeout), tight
    assert refused_after < 0.25, "refused by its deadline, not after"
    assert model.batches == [[1], [3]] and spare.values[0, 0] == 3 and first.values[0, 0] == 1


def test_a_call_that_finds_the_model_free_runs_as_its_admission_judged():
    """Admission times a call to a free model as the warm-up found it; the batch it forms at once does not
    refuse it again on the strength of slower recent batches (a short deadline answered, as before)."""
    model = Model(delay=0.05)

    async def main():
        batcher = Batcher(model, max_batch_size=4, max_wait_s=5)
        batcher.seed([(1, 0.001)])  # the warm-up found 1 ms; the batches here take 50 ms
        await batcher.submit([1])
        await asyncio.sleep(0.01)  # the model is free
        assert batcher.cost.predict(1) > 0.01  # the recent batches predict far past the next deadline
        return await batcher.submit([2], deadline=time.perf_counter() + 0.005)

    assert asyncio.run(main()).values[0, 0] == 2 and model.batches == [[1], [2]]


def test_a_call_larger_than_the_batch_runs_alone_and_a_cancelled_call_is_skipped():
    model = Model(delay=0.05)

    async def main():
        batcher = Batcher(model, max_batch_size=4, max_wait_s=5)
        head = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit([99]))
        big = asyncio.ensure_future(batcher.submit(list(range(1, 7))))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(head, big)

    _, big = asyncio.run(main())
    assert len(big.values) == 6 and [99] not in model.batches and all(99 not in b for b in model.batches)
    assert model.batches == [[0], [1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("size", [1, 3])
def test_batching_off_is_max_batch_size_one(size):
    model = Model(delay=0.01)

    async def main():
        batcher = Batcher(model, max_batch_size=1, max_wait_s=5)
        return await asyncio.gather(*(batcher.submit(list(range(size))) for _ in range(6)))

    asyncio.run(main())
    assert [len(b) for b in model.batches] == [size] * 6  # one call per run, whole


def test_each_call_learns_its_queue_wait_model_time_and_batch_and_each_release_its_reason():
    model, released = Model(delay=0.05), []

    async def main():
        batcher = Batcher(model, max_batch_size=3, max_wait_s=5, on_batch=lambda n, why: released.append((n, why)))
        head = asyncio.ensure_future(batcher.submit([0]))  # runs alone; the next four queue behind it
        await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 5)]
        return await asyncio.gather(head, *rest)

    head, *rest = asyncio.run(main())
    assert released == [(1, "queue_empty"), (3, "full"), (1, "queue_empty")]
    assert [c.batch_rows for c in (head, *rest)] == [1, 3, 3, 3, 1]
    assert head.queue_s < 0.01 and all(c.model_s >= 0.05 for c in (head, *rest))
    # queued behind the first batch, then behind the second too: each wait covers the batches ahead
    assert 0.035 < rest[0].queue_s < rest[3].queue_s and rest[3].queue_s > 0.085
    assert rest[3].queue_s >= rest[0].queue_s + rest[0].model_s - 0.005


def test_batch_cost_fits_a_fixed_and_a_per_row_part_and_follows_the_recent_batches():
    def unloaded(n):
        return 0.002 + 0.0005 * n

    cost = BatchCost(half_life_s=0.1)
    assert cost.predict(8) == 0.0  # nothing measured: admit
    cost.seed([(4, unloaded(4))])
    assert cost.predict(8) == pytest.approx(unloaded(4) * 2)  # one size seen: proportional
    cost.seed([(n, unloaded(n)) for n in (1, 2, 8, 16, 32)])  # the warm-up: the prior
    assert cost.predict(10) == pytest.approx(unloaded(10), rel=0.01)
    for _ in range(30):  # the machine got twice as slow: the fit follows the recent batches
        for n in (1, 16):
            cost.observe(n, 2 * unloaded(n))
    assert cost.predict(10) == pytest.approx(2 * unloaded(10), rel=0.1)
    assert cost.unloaded(10) == pytest.approx(unloaded(10), rel=0.01)
    time.sleep(1.0)  # no batch for ten half-lives: the fit is the prior's again
    assert cost.predict(10) == pytest.approx(unloaded(10), rel=0.05)


def test_a_call_predicted_past_its_deadline_is_refused_at_once_and_one_within_it_runs():
    model = Model(delay=0.1)

    async def main():
        batcher = Batcher(model, max_batch_size=1, max_wait_s=5)
        batcher.seed([(1, 0.1)])  # as the warm-up does
        running = asyncio.ensure_future(batcher.submit([1]))
        await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(batcher.submit([2]))  # a 5 s deadline: waits its turn
        await asyncio.sleep(0.01)
        start = time.perf_counter()
        try:  # behind ~0.08 s of the running batch and 0.1 s of the queued one, plus its own 0.1 s
            await batcher.submit([3], deadline=time.perf_counter() + 0.2)
            refused = None
        except WouldBeLate as err:
            refused = (err, time.perf_counter() - start)
        fits = await batcher.submit([4], deadline=time.perf_counter() + 1.0)
        return refused, await running, await queued, fits

    refused, *answered = asyncio.run(main())
    assert refused is not None, "a call that could only be answered after its deadline was queued"
    err, took = refused
    assert took < 0.005 and 0.2 < err.predicted_s < 0.4 and 0.15 < err.budget_s <= 0.2
    assert [a.values[0, 0] for a in answered] == [1, 2, 4] and [3] not in model.batches


def test_one_stalled_batch_does_not_refuse_a_queue_that_will_answer_in_time():
    """The running batch has taken 20 times its prediction (a stall): the queued calls are predicted at most
    LATE_CAP times the cost model, so a call the queue can answer within its deadline is admitted, and is."""
    stall = threading.Event()

    class Stalled(Model):
        def __call__(self, rows: list) -> np.ndarray:
            if rows == [0]:
                stall.wait(2)  # the first batch stalls until the test lets it go
            return super().__call__(rows)

    model = Stalled(delay=0.001)

    async def main():
        batcher = Batcher(model, max_batch_size=32, max_wait_s=5)
        batcher.seed([(1, 0.01), (10, 0.1)])  # 10 ms a row, as the warm-up found it
        running = asyncio.ensure_future(batcher.submit([0]))
        await asyncio.sleep(0.2)  # 20 times the running batch's 10 ms
        queued = [asyncio.ensure_future(batcher.submit([i])) for i in range(1, 11)]
        await asyncio.sleep(0)
        # uncapped: (10 + 1) rows x 10 ms x 20 = 2.2 s, refused; capped: 0.22 s, within 0.4 / HEADROOM
        predicted = batcher.predicted_wait(1, 1, time.perf_counter())
        late_call = asyncio.ensure_future(batcher.submit([11], deadline=time.perf_counter() + 0.5))
        await asyncio.sleep(0.05)
        stall.set()
        return predicted, await late_call, await running, await asyncio.gather(*queued)

    predicted, answer, *_ = asyncio.run(main())
    assert 0.1 < predicted <= LATE_CAP * 11 * 0.01 + 1e-6, predicted
    assert answer.values[0, 0] == 11


# ---------------------------------------------------------------- text length buckets (serving/adapters/text.py)


def _padding_share(lengths: list[int], groups: list[list[int]]) -> float:
    """Share of padded positions when each group is padded to its own longest member."""
    padded = sum(max(lengths[i] for i in g) * len(g) for g in groups)
    return 1 - sum(lengths) / padded


@pytest.mark.parametrize("max_waste", [0.0, 0.1, 0.3, 0.6])
def test_length_buckets_group_every_index_once_under_the_waste_bound(max_waste):
    from serving.adapters.text import length_buckets

    rng = np.random.default_rng(7)
    lengths = [int(n) for n in rng.choice([3, 4, 5, 9, 12, 30, 31, 64], size=40)]
    groups = length_buckets(lengths, max_waste)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each index exactly once
    for g in groups:  # within each bucket, padding to its longest stays within the bound
        assert 1 - sum(lengths[i] for i in g) / (max(lengths[i] for i in g) * len(g)) <= max_waste + 1e-9
    # similar lengths share a bucket: far fewer buckets than texts, and far less padding than one batch
    assert len(groups) <= len(set(lengths))
    assert _padding_share(lengths, groups) <= max_waste + 1e-9 < _padding_share(lengths, [list(range(40))])


def test_length_buckets_keep_a_uniform_batch_whole_and_split_short_from_long():
    from serving.adapters.text import length_buckets

    assert length_buckets([16] * 8, 0.0) == [list(range(8))]
    assert length_buckets([], 0.3) == []
    groups = length_buckets([60, 4, 62, 5, 4, 64], 0.3)
    assert sorted(map(sorted, groups)) == [[0, 2, 5], [1, 3, 4]]
    assert length_buckets([4, 60], 1.0) == [[0, 1]]  # any waste allowed: one batch


class CountingSession:
    """An ONNX Runtime session that counts its runs and the padded positions of each batch it is given."""

    def __init__(self, session) -> None:
        self.session, self.calls, self.padded, self.tokens = session, 0, 0, 0

    def run(self, names, feeds):
        mask = feeds["attention_mask"]
        self.calls += 1
        self.padded += int(mask.size - mask.sum())
        self.tokens += int(mask.sum())
        return self.session.run(names, feeds)


def test_bucketed_run_restores_the_callers_order_and_matches_one_padded_batch(text_run):
    """TextAdapter.predict with buckets answers row i with text i's probabilities, the same as padding the
    whole batch at once and as running each text alone (attention masks hide the padding); and, counted in
    the session the adapter really runs, buckets on pad fewer positions in more model calls than off."""
    from servable import artifact
    from servable.config import TextServeSettings
    from serving.adapters.text import TextAdapter
    from training import onnx_tools

    art = artifact.load(text_run.tag)
    texts = ["Fine.", "word " * 40, "Dull.", "A gorgeous, witty, seductive movie that I loved " * 2, "ok", "bad " * 30]
    runs, counted = {}, {}
    for buckets in (True, False):
        adapter = TextAdapter(TextServeSettings(model_tag=text_run.tag, length_buckets=buckets))
        adapter.load(art)
        rows, *_ = adapter.decode("text", texts)
        session = onnx_tools.cpu_session(art.onnx_path("fp32"))
        counted[buckets] = CountingSession(session)
        runs[buckets] = adapter.run(counted[buckets], rows)
        alone = np.concatenate([adapter.run(session, [r]) for r in rows])
    np.testing.assert_allclose(runs[True], runs[False], atol=1e-5)
    np.testing.assert_allclose(runs[True], alone, atol=1e-5)  # row i is text i's answer, not a bucket-mate's
    assert len({round(float(p), 4) for p in alone[:, 1]}) > 3  # answers differ, so a mix-up would show
    on, off = counted[True], counted[False]
    assert on.tokens == off.tokens > 0  # the same real tokens ran either way
    assert off.calls == 1 and on.calls > 1, (on.calls, off.calls)  # buckets: one model call per bucket
    # short texts no longer padded to the longest: at most the waste bound, far below one padded batch
    assert on.padded < off.padded / 2, (on.padded, off.padded)
    waste = TextServeSettings().bucket_waste
    assert on.padded <= waste * (on.padded + on.tokens), (on.padded, on.tokens)  # bucket_waste's default
