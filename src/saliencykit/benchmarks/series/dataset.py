"""Procedural time series with planted motifs: the class is the motif, its position the truth.

Each series is `[C,T]` float32: Gaussian noise plus a slow random drift on every channel, one
*motif* planted on one channel at a random position, and one *distractor* (a smooth Gaussian bump
of similar height, the same for every class) planted elsewhere on a random channel. The class is
which motif was planted:

* 0 sine burst (a Hann-windowed sine of 2 periods),
* 1 square pulse (a +/- square wave of 2 periods),
* 2 chirp (a Hann-windowed sine whose frequency rises from 1 to 8 periods per motif length),
* 3 sawtooth (2 rising ramps).

`mask[T]` (bool) marks the time steps the motif covers (on any channel): what a good explanation
of the class should point at. The distractor is never in the mask, so a map that marks every
salient bump is not rewarded. Everything is a pure function of `(seed, i)`.

    >>> batch = generate(16, seed=0)      # series [16,C,T], labels [16], masks [16,T]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...errors import SaliencyError

MOTIFS = ("sine_burst", "square_pulse", "chirp", "sawtooth")
DEFAULT_CHANNELS = 2
DEFAULT_LENGTH = 128
NOISE = 0.25


@dataclass
class SeriesBatch:
    series: np.ndarray     # [N,C,T] float32
    labels: np.ndarray     # [N] int64
    masks: np.ndarray      # [N,T] bool: where the class motif lies
    channels: np.ndarray   # [N] int64: the channel carrying the motif
    distractor: np.ndarray  # [N,T] bool: where the distractor bump lies

    def __len__(self):
        return len(self.labels)


def motif(kind: int, length: int) -> np.ndarray:
    """The motif `kind` (index into MOTIFS) sampled at `length` steps, peak magnitude ~1."""
    t = np.linspace(0.0, 1.0, length, endpoint=False)
    window = np.hanning(length + 2)[1:-1]
    if kind == 0:
        return (np.sin(2 * np.pi * 2 * t) * window).astype(np.float32)
    if kind == 1:
        return np.where(np.sin(2 * np.pi * 2 * t + 1e-9) >= 0, 1.0, -1.0).astype(np.float32)
    if kind == 2:
        phase = 2 * np.pi * (1 * t + 3.5 * t * t)        # frequency 1 -> 8 periods per motif
        return (np.sin(phase) * window).astype(np.float32)
    if kind == 3:
        return (2 * ((2 * t) % 1.0) - 1).astype(np.float32)
    raise SaliencyError(f"unknown motif {kind}; motifs are 0..{len(MOTIFS) - 1} ({', '.join(MOTIFS)})")


def _one(seed: int, i: int, label: int, channels: int, length: int):
    rng = np.random.default_rng([int(seed), int(i), 31337])
    x = rng.normal(0.0, NOISE, (channels, length))
    drift = np.cumsum(rng.normal(0.0, 0.03, (channels, length)), axis=1)
    x += drift - drift.mean(1, keepdims=True)
    m_len = int(rng.integers(length // 6, length // 4 + 1))
    d_len = int(rng.integers(length // 8, length // 5 + 1))
    # motif and distractor never overlap: pick the motif start, then a distractor start clear of it
    start = int(rng.integers(0, length - m_len + 1))
    free = [s for s in range(0, length - d_len + 1) if s + d_len <= start - 2 or s >= start + m_len + 2]
    ch = int(rng.integers(channels))
    amp = rng.uniform(1.0, 1.6) * rng.choice([-1.0, 1.0])
    x[ch, start:start + m_len] += amp * motif(label, m_len)
    mask = np.zeros(length, bool)
    mask[start:start + m_len] = True
    dmask = np.zeros(length, bool)
    if free:
        d0 = int(free[int(rng.integers(len(free)))])
        t = np.linspace(-2.5, 2.5, d_len)
        x[int(rng.integers(channels)), d0:d0 + d_len] += rng.uniform(1.0, 1.6) * rng.choice([-1.0, 1.0]) * np.exp(-t * t / 2)
        dmask[d0:d0 + d_len] = True
    return x.astype(np.float32), mask, ch, dmask


def generate(n: int, seed: int = 0, channels: int = DEFAULT_CHANNELS, length: int = DEFAULT_LENGTH) -> SeriesBatch:
    """`n` series with balanced classes (i % 4, shuffled by the seed); the same arguments give the
    same arrays."""
    if n < 1:
        raise SaliencyError(f"n must be >= 1, got {n}")
    if not 1 <= channels <= 8:
        raise SaliencyError(f"channels must be in 1..8, got {channels}")
    if length < 64:
        raise SaliencyError(f"length must be >= 64 steps (a motif spans length/6..length/4), got {length}")
    rng = np.random.default_rng([int(seed), 104729])
    labels = rng.permutation(np.arange(n) % len(MOTIFS)).astype(np.int64)
    xs, ms, chs, ds = zip(*(_one(seed, i, int(labels[i]), channels, length) for i in range(n)))
    return SeriesBatch(np.stack(xs), labels, np.stack(ms), np.array(chs, np.int64), np.stack(ds))


def to_tensor(series: np.ndarray):
    """`[N,C,T]` float array -> float32 tensor (the series are already zero-mean, unit-ish scale)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(series, dtype=np.float32))


def labels() -> list[str]:
    return list(MOTIFS)
