"""Expert utilisation: per-scenario mean gate weights and their heatmap image."""

from __future__ import annotations

import numpy as np
import torch

from dlrm_mtl.synthetic import synthetic_schema
from dlrm_mtl.utilisation import ExpertUtilisation, render_heatmap

SCHEMA = synthetic_schema()  # 2 x 2 = 4 leaf scenarios


def test_means_per_scenario_and_gate_match_a_loop():
    torch.manual_seed(0)
    util = ExpertUtilisation(SCHEMA)
    ref_sum = {"a": np.zeros((4, 1, 3)), "b": np.zeros((4, 2, 5))}
    ref_n = np.zeros(4)
    for _ in range(3):
        B = 10
        scenario = torch.randint(0, 2, (B, 2))
        real = torch.rand(B) > 0.3
        ga = torch.softmax(torch.randn(B, 3), -1)
        gb = torch.softmax(torch.randn(B, 2, 5), -1)
        util.update({"a": ga, "b": gb}, scenario, real)
        for i in range(B):
            if not real[i]:
                continue  # padding rows do not count
            leaf = int(scenario[i, 0]) * 2 + int(scenario[i, 1])
            ref_n[leaf] += 1
            ref_sum["a"][leaf, 0] += ga[i].numpy()
            ref_sum["b"][leaf] += gb[i].numpy()
    means, counts = util.compute()
    np.testing.assert_array_equal(counts.numpy(), ref_n)
    for k in ("a", "b"):
        np.testing.assert_allclose(means[k].numpy(), ref_sum[k] / ref_n[:, None, None], atol=1e-12)
    maps = util.heatmaps()
    m, rows = maps["a"]
    assert m.shape == (4, 3) and len(rows) == 4  # scenario x expert
    m, rows = maps["b"]
    assert m.shape == (2, 5) and rows == ["gate0", "gate1"]  # gate x expert, weighted by rows
    np.testing.assert_allclose(m, ref_sum["b"].sum(0) / ref_n.sum(), atol=1e-12)


def test_scenario_without_rows_is_nan_not_zero():
    util = ExpertUtilisation(SCHEMA)
    util.update({"g": torch.tensor([[0.25, 0.75]])}, torch.tensor([[0, 0]]), torch.tensor([True]))
    m, _ = util.heatmaps()["g"]
    np.testing.assert_allclose(m[0], [0.25, 0.75])
    assert np.isnan(m[1:]).all()


def test_heatmap_image_shape_and_brightness_ordering():
    img = render_heatmap(np.array([[0.0, 1.0], [0.5, np.nan]]), cell=4)
    assert img.shape == (3, 8, 8) and img.dtype == np.uint8
    cell = lambda r, c: img[:, r * 4 + 2, c * 4 + 2].astype(int)
    assert cell(0, 1).sum() > cell(1, 0).sum() > cell(0, 0).sum()  # brighter = more weight
    assert (cell(1, 1) == 127).all()  # NaN: grey


def test_tensorboard_shows_one_image_histogram_and_text_per_gate(tmp_path):
    """Read back through TensorBoard's own data provider (what its pages list): every gate has
    its heatmap on the images page, its histogram on the histograms page, its labels as text."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from torch.utils.tensorboard import SummaryWriter

    from dlrm_mtl.train import log_utilisation

    class Heatmaps:
        def heatmaps(self):
            return {"scenario0/cgc": (np.array([[0.5, 0.5], [0.9, 0.1]]), ["a", "b"]),
                    "task0/ctr": (np.array([[0.2, 0.8]]), ["ctr"])}

    writer = SummaryWriter(str(tmp_path))
    for step in (1, 2):
        out = log_utilisation(Heatmaps(), writer, step)
    writer.close()
    assert out["task0/ctr"]["matrix"] == [[0.2, 0.8]]
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    ctx = context.RequestContext()
    images = provider.list_blob_sequences(ctx, experiment_id="", plugin_name="images")["."]
    hists = provider.list_tensors(ctx, experiment_id="", plugin_name="histograms")["."]
    texts = provider.list_tensors(ctx, experiment_id="", plugin_name="text")["."]
    gates = {"scenario0/cgc", "task0/ctr"}
    assert set(images) == {f"utilisation/{g}" for g in gates}
    assert set(hists) == {f"utilisation_mean/{g}" for g in gates}
    assert set(texts) == {f"utilisation_rows/{g}/text_summary" for g in gates}  # add_text appends /text_summary
    assert all(images[t].max_step == 2 for t in images)
