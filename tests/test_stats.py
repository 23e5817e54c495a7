import numpy as np

from pipelines.runtime.stats import ChannelStats, latent_stats_report, merge_all, stats_of_latents, stats_of_rows


def test_merged_partials_equal_numpy_over_all_latents():
    latents = np.random.default_rng(0).normal(2.0, 3.0, size=(37, 4, 8, 6)).astype(np.float32)
    partials = [ChannelStats.of(latents[start:start + 5]) for start in range(0, 37, 5)]
    merged = merge_all(partials[::-1])  # order must not matter
    per_channel = latents.transpose(1, 0, 2, 3).reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(merged.mean, per_channel.mean(axis=1), rtol=1e-10)
    np.testing.assert_allclose(merged.std, per_channel.std(axis=1), rtol=1e-10)
    np.testing.assert_array_equal(merged.minimum, per_channel.min(axis=1))
    np.testing.assert_array_equal(merged.maximum, per_channel.max(axis=1))
    assert merged.count.tolist() == [37 * 48] * 4


def test_rows_of_different_sizes_merge_exactly():
    rng = np.random.default_rng(1)
    latents = [rng.normal(size=(4, 8, 8)), rng.normal(1.0, 2.0, size=(4, 4, 12))]
    flat = [latent.reshape(4, -1) for latent in latents]
    stats = stats_of_rows(
        np.array([64, 48]), np.array([f.mean(1) for f in flat]), np.array([f.std(1) for f in flat]),
        np.array([f.min(1) for f in flat]), np.array([f.max(1) for f in flat]),
    )
    everything = np.concatenate(flat, axis=1)
    np.testing.assert_allclose(stats.mean, everything.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.std, everything.std(axis=1), rtol=1e-12)
    assert stats.count.tolist() == [112] * 4


def test_round_trip_through_json_keeps_the_aggregate():
    stats = ChannelStats.of(np.random.default_rng(2).normal(size=(3, 4, 2, 2)))
    again = ChannelStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(again.m2, stats.m2)
    np.testing.assert_array_equal(again.count, stats.count)


def test_latent_stats_json_has_one_format_for_generate_and_encode():
    latents = list(np.random.default_rng(2).normal(0.5, 2.0, size=(6, 4, 4, 4)))
    encode = latent_stats_report(stats_of_latents(latents), latent_channels=4, scaling_factor=0.5, shift_factor=0.0, over="the latent column")
    generate = latent_stats_report(stats_of_latents(latents), latent_channels=4, scaling_factor=0.5, shift_factor=0.0,
                                   over="the final latents", suggests="the generated latents suggest")
    assert set(encode) == set(generate) == {
        "latent_channels", "over", "scaling_factor", "shift_factor", "count", "mean", "std", "min", "max", "m2",
        "all_channels", "suggested", "warnings",
    }
    assert encode["warnings"][0].startswith("WARNING: the corpus suggests scaling_factor")
    assert generate["warnings"][0].startswith("WARNING: the generated latents suggest scaling_factor")
    # nothing committed yet: the same keys but the statistics
    empty = latent_stats_report(None, latent_channels=4, scaling_factor=0.5, shift_factor=0.0, over="the latent column")
    assert empty == {"latent_channels": 4, "over": "the latent column", "scaling_factor": 0.5, "shift_factor": 0.0, "warnings": []}
