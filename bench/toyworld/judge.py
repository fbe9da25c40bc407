"""Stage 2 of the build: the judge, an attribute classifier CNN that scores generated images.

It reads colour, shape (hidden ones included), size and position from a ComfyUI IMAGE [B, H, W, 3] in 0..1.
Generated images are VAE decodes, so it trains on a 50/50 mix of clean renders and stock VAE round trips
(`VAE.encode` → `VAE.decode`) of every combination, with blur, noise and colour-shift augmentation.
No flips: they would swap left and right.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import world
from .models import DEVICE

WEIGHTS = Path(__file__).resolve().parent / "weights" / "judge.safetensors"
HEADS = tuple((a, len(world.CLASSES[a])) for a in world.ATTRIBUTES)


class Judge(nn.Module):
    """Six conv blocks (64 → 4 px) and a 256-wide feature layer shared by one linear head per attribute."""

    def __init__(self) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.ReLU())
        self.body = nn.Sequential(block(3, 32, 1), block(32, 32, 2), block(32, 64, 1), block(64, 64, 2),
                                  block(64, 96, 2), block(96, 128, 2))              # -> [B, 128, 4, 4]
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(256, n) for _, n in HEADS])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in -1..1 -> [B, 256]."""
        return self.fc(self.body(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.features(x)
        return [h(f) for h in self.heads]


def load_judge(path: Path = WEIGHTS) -> Judge:
    judge = Judge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().to(DEVICE)


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """IMAGE [N, H, W, 3] in 0..1 -> class indices [N, 4] (world.ATTRIBUTES order) and features [N, 256]."""
    preds, feats = [], []
    device = next(judge.parameters()).device
    for i in range(0, len(images), batch_size):
        f = judge.features(images[i:i + batch_size].to(device).permute(0, 3, 1, 2) * 2 - 1)
        feats.append(f.cpu())
        preds.append(torch.stack([h(f).argmax(-1) for h in judge.heads], 1).cpu())
    return torch.cat(preds), torch.cat(feats)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute and all-four accuracy of [N, 4] predictions against [N, 4] labels."""
    out = {a: (preds[:, k] == labels[:, k]).float().mean().item() for k, a in enumerate(world.ATTRIBUTES)}
    out["all4"] = (preds == labels).all(1).float().mean().item()
    return out


@torch.no_grad()
def round_trip(vae: Any, images: np.ndarray, chunk: int = 500) -> np.ndarray:
    """uint8 [N, H, W, 3] through the stock VAE.encode → VAE.decode, back to uint8."""
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).float() / 255
        out.append((vae.decode(vae.encode(x)).clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    return np.ascontiguousarray(np.concatenate(out))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[B, 3, H, W] in -1..1: a 3×3 blur on half the batch, pixel noise, and a small per-image colour shift."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).contiguous().to(x.device),
                       groups=3)
    pick = (torch.rand(b, 1, 1, 1, generator=g) < 0.5).float().to(x.device)
    x = pick * blurred + (1 - pick) * x
    x = x + (torch.randn(x.shape, generator=g) * 0.04 * torch.rand(b, 1, 1, 1, generator=g)).to(x.device)
    return x + ((torch.rand(b, 3, 1, 1, generator=g) - 0.5) * 0.06).to(x.device)


def judge_data(vae: Any, n: int, seed: int, path: Path, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """n renders of any combination with their VAE round trips, cached at `path`."""
    if path.exists():
        return load_file(str(path))
    start = time.time()
    images, _, labels, _ = world.make_images(n, seed, training_only=False)
    data = {"clean": torch.from_numpy(images), "decoded": torch.from_numpy(round_trip(vae, images)),
            "labels": torch.from_numpy(labels)}
    save_file(data, str(path))
    log(f"judge data: {n} images and round trips in {time.time() - start:.0f} s")
    return data


def evaluate(judge: Judge, vae: Any, n: int = 1000, seed: int = 4242) -> dict[str, Any]:
    """Accuracy on n fresh random images of every combination, clean and after a VAE round trip."""
    images, _, labels, _ = world.make_images(n, seed, training_only=False)
    lab = torch.from_numpy(labels)
    out: dict[str, Any] = {"n": n, "seed": seed}
    for name, imgs in (("clean", images), ("vae_round_trip", round_trip(vae, images))):
        preds, _ = predict(judge, torch.from_numpy(imgs).float() / 255)
        out[name] = accuracy(preds, lab)
        out[name + "_per_shape"] = {s: (preds[lab[:, 1] == i, 1] == i).float().mean().item()
                                    for i, s in enumerate(world.SHAPES)}
    return out


def train_judge(vae: Any, steps: int, seed: int, cache: Path, log: Callable[[str], None],
                n_images: int = 12000, batch_size: int = 64) -> dict[str, Any]:
    """Train the judge, save it to weights/judge.safetensors and return its stats."""
    data = judge_data(vae, n_images, seed, cache / "judge_data.safetensors", log)
    torch.manual_seed(seed)
    judge = Judge().to(DEVICE)
    data = {k: v.to(DEVICE) for k, v in data.items()}
    opt = torch.optim.AdamW(judge.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, n_images, (batch_size,), generator=g).to(DEVICE)
        decoded = (torch.rand(batch_size, generator=g) < 0.5).to(DEVICE)          # which ones are round trips
        images = torch.where(decoded[:, None, None, None], data["decoded"][idx], data["clean"][idx])
        x = augment(images.float().div(255).permute(0, 3, 1, 2) * 2 - 1, g)
        labels = data["labels"][idx]
        loss = sum(F.cross_entropy(logits, labels[:, k]) for k, logits in enumerate(judge(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    judge.eval()
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in judge.state_dict().items()}, str(WEIGHTS))
    stats = {"steps": steps, "batch_size": batch_size, "images": n_images, "seconds": time.time() - start,
             "params": sum(p.numel() for p in judge.parameters())}
    stats.update(evaluate(judge, vae))
    return stats
