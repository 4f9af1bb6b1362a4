"""After the warm-up, one run hands the ONNX Runtime CPU arena's free memory back (serving/onnx_runtime.py):
the warm-up's largest batches would otherwise stay in every worker's memory at rest."""

from __future__ import annotations

import numpy as np

from servable.config import ImageServeSettings


def test_the_last_warm_up_run_shrinks_the_arena_and_answers_like_any_run(image_run, monkeypatch):
    from serving import loading
    from serving.adapters.image import ImageAdapter

    runs: list[dict] = []
    real = loading.ArenaShrinking

    class Recording(real):
        def run(self, output_names, input_feed, run_options=None):
            runs.append({"config": self.options.get_run_config_entry("memory.enable_memory_arena_shrinkage"),
                         "rows": len(next(iter(input_feed.values())))})  # fmt: skip
            return super().run(output_names, input_feed)

    monkeypatch.setattr(loading, "ArenaShrinking", Recording)
    adapter, model, run = loading.load_model(ImageAdapter, ImageServeSettings(model_tag=image_run.tag),
                                             with_session=True)  # fmt: skip
    assert model.ready and runs == [{"config": "cpu:0", "rows": 1}]  # once, after every shape, the smallest
    rows = adapter.warmup_batches([3])[0]
    np.testing.assert_array_equal(adapter.run(real(model.session), rows), run(rows))  # the same answers
