"""The parts benchmark: `dataset` renders scenes whose parts decide the class, `models` trains and
loads the small CNN and ViT (weights shipped in `weights/`), `leaderboard` scores methods on them."""
