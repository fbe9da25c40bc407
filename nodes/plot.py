"""The loss curve as an IMAGE, for saving next to the concept: raw loss per step and its smoothed trend."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

SMOOTHING = 0.9  # EMA factor of the smoothed curve; the web chart uses the same


def smoothed(values: Sequence[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing), so it starts at the data."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        out.append(average / (1 - factor ** i))
    return out


def loss_plot(losses: Sequence[float], title: str, width: int = 768, height: int = 384) -> torch.Tensor:
    """An IMAGE [1, height, width, 3] of the loss per step (thin) and its smoothed trend (thick)."""
    image = Image.new("RGB", (width, height), "#1e1e1e")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 64, width - 16, 36, height - 32
    draw.text((left, 10), title, fill="#e0e0e0")
    draw.rectangle([left, top, right, bottom], outline="#555555")
    if losses:
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0

        def point(i: int, value: float) -> tuple[float, float]:
            x = left + (right - left) * (i / max(1, len(losses) - 1))
            return x, bottom - (bottom - top) * (value - low) / span

        for value, label in ((high, f"{high:.4f}"), (low, f"{low:.4f}")):
            draw.text((4, point(0, value)[1] - 6), label, fill="#b0b0b0")
        draw.text((left, bottom + 8), "step 1", fill="#b0b0b0")
        draw.text((right - 70, bottom + 8), f"step {len(losses)}", fill="#b0b0b0")
        if len(losses) > 1:
            draw.line([point(i, v) for i, v in enumerate(losses)], fill="#5a6f99", width=1)
            draw.line([point(i, v) for i, v in enumerate(smoothed(losses))], fill="#b197fc", width=3)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]
