"""Ground-truth benchmarks for explanation methods. `parts`: the procedural part-based dataset,
its trained models and the leaderboard (FunnyBirds protocol)."""
