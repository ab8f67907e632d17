"""The one seeded training loop of the small shipped models (series CNN, denoiser, volume
segmenter): AdamW with a one-cycle schedule over shuffled minibatches, a fixed thread count
(the weights are reproducible bit for bit with the same seed, threads and machine)."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def fit(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, loss_fn: Callable, epochs: int, batch: int,
        lr: float, seed: int = 0, threads: int | None = 1, log=print, name: str = "model",
        augment: Callable | None = None, weight_decay: float = 1e-4) -> dict:
    """Train `model` in place on `(x_all, y_all)`; `augment(xb, yb, generator) -> (xb, yb)` may
    change each minibatch (noise for the denoiser). Returns the training facts (seconds, seed,
    threads, last epoch's mean loss); the model is left in eval mode."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        n = x_all.shape[0]
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps = epochs * ((n + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(int(seed))
        model.train()
        mean_loss = float("nan")
        for ep in range(epochs):
            order = torch.randperm(n, generator=g)
            loss_sum = 0.0
            for i in range(0, n, batch):
                idx = order[i:i + batch]
                xb, yb = x_all[idx], y_all[idx]
                if augment is not None:
                    xb, yb = augment(xb, yb, g)
                loss = loss_fn(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
            mean_loss = loss_sum / n
            if log:
                log(f"{name} epoch {ep + 1}/{epochs}: loss {mean_loss:.4f} ({time.perf_counter() - t0:.0f}s)")
        model.eval()
        return {"seed": int(seed), "epochs": int(epochs), "n_train": int(n), "threads": torch.get_num_threads(),
                "seconds": time.perf_counter() - t0, "final_loss": mean_loss}
    finally:
        torch.set_num_threads(old_threads)
