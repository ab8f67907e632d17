"""Small classifiers for the procedural parts dataset (`saliencykit.benchmarks.parts.dataset`): a CNN and a ViT,
their seeded training loop, and `load_parts_model(arch)` returning a ready `Subject`.

The shipped weights (`weights/parts_cnn.pt`, `parts_vit.pt` beside this file) were made by

    saliencykit train-parts --arch cnn --out parts_cnn.pt --seed 0
    saliencykit train-parts --arch vit --out parts_vit.pt --seed 0

which reproduces them bit for bit on the same machine with the same thread count (training pins
`torch.set_num_threads(1)` unless told otherwise: on a shared 2-core machine one thread trained
these small models 3-20x faster than two, which spend their time waiting for each other).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import dataset as parts
from ...errors import SaliencyError

WEIGHTS = Path(__file__).parent / "weights"
ARCHS = ("cnn", "vit")
IMAGE_SIZE = parts.DEFAULT_SIZE


class PartsCNN(nn.Module):
    """Four 3×3 conv blocks (8-16-32-32 channels, max-pool after the first three), global average
    pooling, linear head; optional BatchNorm after each conv. Grad-CAM's natural layer is the last
    ReLU of `features` (8×8)."""

    def __init__(self, n_classes: int = parts.DEFAULT_CLASSES, width: int = 8, norm: bool = False):
        super().__init__()
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1)] + ([nn.BatchNorm2d(cout)] if norm else []) + [nn.ReLU()]
        self.features = nn.Sequential(
            *block(3, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.MaxPool2d(2), *block(4 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * w, n_classes)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention laid out like timm's `Attention` (`qkv`, `attn_drop` applied to the
    attention probabilities, `proj`, `fused_attn`), so the attention-reading methods find it."""

    fused_attn = False

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Identity()        # a module on the probabilities: hooks read them here
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * (d // self.num_heads) ** -0.5).softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PartsViT(nn.Module):
    """A small ViT: 16×16 patches on 64×64 inputs (a 4×4 token grid), a class token, 4 pre-norm
    blocks of width 64 with 4 heads. With `stem=True` (the shipped model) each patch is embedded by
    a small convolutional stem instead of one linear projection; the plain linear patchify reached
    only 67 % held-out accuracy in the CPU training budget, the stem 95 %+."""

    def __init__(self, n_classes: int = parts.DEFAULT_CLASSES, size: int = IMAGE_SIZE, patch: int = 16,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp: int = 128, stem: bool = False):
        super().__init__()
        self.patch = patch
        self.grid = size // patch
        if stem:    # convolutional stem (Xiao et al. 2021): three stride-2 3x3 convs, then a 2x2 patchify
            if patch != 16:
                raise SaliencyError("the convolutional stem makes 16-pixel patches only")
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                      nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU())
            self.patch_embed = nn.Conv2d(64, dim, 2, stride=2)
        else:
            self.stem = nn.Identity()
            self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, self.grid ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        t = self.patch_embed(self.stem(x)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1) + self.pos_embed
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])


def build(arch: str, n_classes: int = parts.DEFAULT_CLASSES, **config) -> nn.Module:
    if arch == "cnn":
        return PartsCNN(n_classes, **config)
    if arch == "vit":
        return PartsViT(n_classes, **config)
    raise SaliencyError(f"unknown parts architecture {arch!r}; choose one of {', '.join(ARCHS)}")


#: architecture options of the shipped models
CONFIGS = {"cnn": {"norm": True}, "vit": {"stem": True}}
#: training recipe per architecture: (n_train, epochs, lr, batch)
RECIPES = {"cnn": (5000, 12, 4e-3, 64), "vit": (8000, 40, 2e-3, 128)}


def train(arch: str, seed: int = 0, threads: int | None = 1, n_train: int | None = None,
          epochs: int | None = None, log=print, config: dict | None = None) -> tuple[nn.Module, dict]:
    """Train `arch` on freshly generated images (50 % with 1-4 part types left out); seeded.
    Returns the model (eval mode) and a dict of training facts."""
    if arch not in ARCHS:
        raise SaliencyError(f"unknown parts architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    r_n, r_epochs, lr, bs = RECIPES[arch]
    n_train = int(n_train or r_n)
    epochs = int(epochs or r_epochs)
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        t0 = time.perf_counter()
        batch = parts.generate(n_train, seed=10_000 + seed, omit_prob=0.5)
        x_all = parts.to_tensor(batch.images)
        y_all = torch.from_numpy(batch.labels)
        torch.manual_seed(seed)
        config = dict(CONFIGS[arch] if config is None else config)
        model = build(arch, **config)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05 if arch == "vit" else 1e-4)
        steps = epochs * ((n_train + bs - 1) // bs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for ep in range(epochs):
            order = torch.randperm(n_train, generator=g)
            total, correct, loss_sum = 0, 0, 0.0
            for i in range(0, n_train, bs):
                idx = order[i:i + bs]
                xb, yb = x_all[idx], y_all[idx]
                if torch.rand((), generator=g) < 0.5:          # horizontal flip (the birds are rotated anyway)
                    xb = xb.flip(-1)
                out = model(xb)
                loss = nn.functional.cross_entropy(out, yb, label_smoothing=0.05)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.item() * len(idx)
                correct += int((out.argmax(1) == yb).sum())
                total += len(idx)
            if log:
                log(f"{arch} epoch {ep + 1}/{epochs}: loss {loss_sum / total:.3f} train acc {correct / total:.3f} "
                    f"({time.perf_counter() - t0:.0f}s)")
        model.eval()
        info = {"arch": arch, "config": config, "seed": seed, "n_train": n_train, "epochs": epochs, "threads": torch.get_num_threads(),
                "seconds": time.perf_counter() - t0}
        return model, info
    finally:
        torch.set_num_threads(old_threads)


def save(model: nn.Module, info: dict, path) -> Path:
    from ...files import atomic_write

    path = Path(path)
    payload = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "info": info,
               "config": dict(info.get("config", {})),
               "n_classes": model.head.out_features}
    atomic_write(path, lambda p: torch.save(payload, p))
    return path


def load_parts_model(arch: str = "cnn", weights=None) -> "Subject":
    """A `Subject` around the trained parts model (`weights` defaults to the shipped file)."""
    from ...subject import Subject

    if arch not in ARCHS:
        raise SaliencyError(f"unknown parts architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    path = Path(weights) if weights is not None else WEIGHTS / f"parts_{arch}.pt"
    if not path.exists():
        raise SaliencyError(f"no weights at {path}; make them with `saliencykit train-parts --arch {arch} --out {path}`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = build(arch, int(payload["n_classes"]), **payload.get("config", {}))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    layer = f"features.{len(model.features) - 1}" if arch == "cnn" else "auto"
    subject = Subject(model, preprocess=_Preprocess(), labels=parts.labels(int(payload["n_classes"])),
                      mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), input_size=(IMAGE_SIZE, IMAGE_SIZE),
                      layer=layer, name=f"parts-{arch}")
    if arch == "vit":
        g = model.grid
        subject.grid_fn = lambda tokens: tokens[:, 1:].reshape(tokens.shape[0], g, g, -1).permute(0, 3, 1, 2)
    return subject


class _Preprocess:
    """A photo (PIL / array / path) resized to 64×64, as the parts models expect."""

    def __call__(self, photo):
        from PIL import Image

        if isinstance(photo, (str, Path)):
            photo = Image.open(photo)
        if not isinstance(photo, Image.Image):
            photo = Image.fromarray(np.asarray(photo))
        arr = np.asarray(photo.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))
        return parts.to_tensor(arr[None])[0]
