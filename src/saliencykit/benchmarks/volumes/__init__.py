"""Procedural 3-D volumes with known organ masks (`dataset`), the training of the tiny 3-D
U-Net that segments them (`models`; architecture and shipped weights in
`saliencykit.models.small`) and the leaderboard of aggregated attributions scored against the
organ masks (`leaderboard`)."""
