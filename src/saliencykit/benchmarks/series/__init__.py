"""The planted-motif time-series benchmark: `dataset` makes seeded `[C,T]` series whose class is
the motif planted in them (its position is the ground-truth mask), `models` trains the small 1-D
CNN (architecture and shipped weights in `saliencykit.models.small`), `leaderboard` scores maps
against the masks."""
