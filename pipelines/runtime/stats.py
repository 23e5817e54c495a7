"""Exact per-channel latent statistics, merged from per-batch partial aggregates.

Each batch contributes (count, mean, M2, min, max) per channel; partials merge with
Chan et al.'s parallel formula, which is exact in arithmetic and numerically stable
(unlike summing squares), so the order batches arrive in does not matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChannelStats:
    count: np.ndarray  # values seen per channel (int64)
    mean: np.ndarray
    m2: np.ndarray  # sum of squared deviations from the mean
    minimum: np.ndarray
    maximum: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        return cls(
            count=np.zeros(channels, np.int64), mean=np.zeros(channels), m2=np.zeros(channels),
            minimum=np.full(channels, np.inf), maximum=np.full(channels, -np.inf),
        )

    @classmethod
    def of(cls, latents: np.ndarray) -> "ChannelStats":
        """Statistics of latents shaped (rows, channels, ...)."""
        values = np.moveaxis(np.asarray(latents, dtype=np.float64), 1, 0).reshape(latents.shape[1], -1)
        mean = values.mean(axis=1)
        return cls(
            count=np.full(values.shape[0], values.shape[1], np.int64), mean=mean,
            m2=((values - mean[:, None]) ** 2).sum(axis=1), minimum=values.min(axis=1), maximum=values.max(axis=1),
        )

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        if len(self.count) != len(other.count):
            raise ValueError(f"latent channels differ: {len(self.count)} vs {len(other.count)}")
        count = self.count + other.count
        safe = np.maximum(count, 1)
        delta = other.mean - self.mean
        return ChannelStats(
            count=count,
            mean=self.mean + delta * other.count / safe,
            m2=self.m2 + other.m2 + delta**2 * self.count * other.count / safe,
            minimum=np.minimum(self.minimum, other.minimum),
            maximum=np.maximum(self.maximum, other.maximum),
        )

    def pooled(self) -> "ChannelStats":
        """All channels as one (the figure a single scaling/shift factor is fitted to)."""
        count = int(self.count.sum())
        mean = float((self.count * self.mean).sum() / max(count, 1))
        m2 = float(self.m2.sum() + (self.count * (self.mean - mean) ** 2).sum())
        return ChannelStats(
            count=np.array([count], np.int64), mean=np.array([mean]), m2=np.array([m2]),
            minimum=np.array([self.minimum.min()]), maximum=np.array([self.maximum.max()]),
        )

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof=0), as ``numpy.std``."""
        return np.sqrt(self.m2 / np.maximum(self.count, 1))

    def to_dict(self) -> dict:
        return {
            "count": self.count.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist(),
            "min": self.minimum.tolist(), "max": self.maximum.tolist(), "m2": self.m2.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ChannelStats":
        return cls(
            count=np.asarray(data["count"], np.int64), mean=np.asarray(data["mean"], np.float64),
            m2=np.asarray(data["m2"], np.float64), minimum=np.asarray(data["min"], np.float64),
            maximum=np.asarray(data["max"], np.float64),
        )


def merge_all(partials: list[ChannelStats]) -> ChannelStats | None:
    total = None
    for partial in partials:
        total = partial if total is None else total.merge(partial)
    return total


def stats_of_rows(count: np.ndarray, mean: np.ndarray, std: np.ndarray, minimum: np.ndarray, maximum: np.ndarray) -> ChannelStats:
    """Merge per-row aggregates (rows x channels) in one step, exactly.

    M2 of the union = sum of the rows' M2 + sum of n_i * (mean_i - mean)^2.
    """
    count = np.asarray(count, np.int64)
    mean = np.asarray(mean, np.float64)
    weights = np.broadcast_to(count[:, None], mean.shape).astype(np.float64)
    total = weights.sum(axis=0)
    overall = (weights * mean).sum(axis=0) / np.maximum(total, 1)
    m2 = (weights * np.asarray(std, np.float64) ** 2).sum(axis=0) + (weights * (mean - overall) ** 2).sum(axis=0)
    return ChannelStats(
        count=total.astype(np.int64), mean=overall, m2=m2,
        minimum=np.asarray(minimum, np.float64).min(axis=0), maximum=np.asarray(maximum, np.float64).max(axis=0),
    )


def stats_of_latents(latents: list[np.ndarray]) -> ChannelStats | None:
    """Exact statistics of latents shaped (channels, ...), whatever their sizes: one aggregate per shape, merged."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for latent in latents:
        by_shape.setdefault(latent.shape, []).append(latent)
    return merge_all([ChannelStats.of(np.stack(group)) for group in by_shape.values()])


# -- latent_stats.json (one format for generate and encode) ---------------------------------------

FACTOR_TOLERANCE = 0.10  # suggested scaling/shift factors further than this from the model's get a warning


def latent_stats_report(
    stats: ChannelStats | None, *, latent_channels: int, scaling_factor: float, shift_factor: float, over: str,
    suggests: str = "the corpus suggests",
) -> dict:
    """latent_stats.json: per-channel statistics of the latents (``over`` says which) and the factors they suggest.

    Stored latents (and generation's final latents, what the VAE decoder receives) are
    ``(z - shift) * scaling``. Latents whose raw values z have mean m and std s suggest
    ``scaling = 1 / s`` and ``shift = m`` (the factors that would give scaled latents mean
    0, std 1). Both are compared with the model's on the scale of the scaled latents: the
    scaling factor is off by more than 10% when their std is outside [1/1.1, 1/0.9], the
    shift when their mean is more than 0.1 std from zero (a relative test against a shift
    of 0 would always fail). ``suggests`` opens each warning ("the corpus suggests").
    """
    report = {"latent_channels": latent_channels, "over": over, "scaling_factor": scaling_factor, "shift_factor": shift_factor}
    if stats is None:
        return {**report, "warnings": []}
    pooled = stats.pooled()
    stored_mean, stored_std = float(pooled.mean[0]), float(pooled.std[0])
    suggested_scaling = scaling_factor / stored_std if stored_std > 0 else None
    suggested_shift = shift_factor + stored_mean / scaling_factor
    warnings = []
    if suggested_scaling is None or abs(suggested_scaling / scaling_factor - 1) > FACTOR_TOLERANCE:
        warnings.append(
            f"WARNING: {suggests} scaling_factor {suggested_scaling} (1/std of the raw latents), the model uses "
            f"{scaling_factor}: more than {FACTOR_TOLERANCE:.0%} apart (stored latents have std {stored_std:.4g}, not 1)"
        )
    if stored_std == 0 or abs(stored_mean) > FACTOR_TOLERANCE * stored_std:
        warnings.append(
            f"WARNING: {suggests} shift_factor {suggested_shift:.6g} (mean of the raw latents), the model uses "
            f"{shift_factor}: stored latents have mean {stored_mean:.4g}, more than {FACTOR_TOLERANCE:g} std from 0"
        )
    return {
        **report, **stats.to_dict(),
        "all_channels": {"count": int(pooled.count[0]), "mean": stored_mean, "std": stored_std},
        "suggested": {"scaling_factor": suggested_scaling, "shift_factor": suggested_shift},
        "warnings": warnings,
    }
