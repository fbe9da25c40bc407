"""Training progress in ComfyUI: the node's progress bar (which is also the Cancel check), preview images, a
console line, the step/loss text on the node and live `concept_forge.loss` events for the web chart, whose history
stays on the server so a reloaded page can redraw the curve (docs/COMFYUI.md §5.5)."""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable

import comfy.model_management as mm
import comfy.utils
import numpy as np
from PIL import Image

LOSS_EVENT = "concept_forge.loss"
log = logging.getLogger("concept_forge")

# node id → the latest run's loss curve, replayed by GET /concept_forge/loss_history after a page reload
LOSS_HISTORY: dict[str, dict[str, Any]] = {}


@functools.cache
def _server_class() -> Any:
    # cached: a failed import is retried from source every time, which cost a headless run 12 ms per step
    try:
        from server import PromptServer
    except ImportError:  # a library import of the pack (tests, scripts) has no server
        return None
    return PromptServer


def _server() -> Any:
    return getattr(_server_class(), "instance", None)


def register_routes() -> None:
    """GET /concept_forge/loss_history: every Learn Concept node's latest curve, for a page that reloads mid-run."""
    server = _server()
    if server is None:
        return
    from aiohttp import web

    @server.routes.get("/concept_forge/loss_history")
    async def loss_history(request: web.Request) -> web.Response:
        return web.json_response(LOSS_HISTORY)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def to_pil(image: Any) -> Image.Image:
    """A ComfyUI IMAGE [1, H, W, 3] in 0..1 → PIL."""
    return Image.fromarray((image[0].clamp(0, 1).cpu().numpy() * 255).astype(np.uint8))


class NodeProgress:
    """The loop's `on_step` for a node: called after every optimizer step.

    Args:
        node_id: the node's id (None outside the executor).
        label: the concept's name, for log lines.
        total: the run's last step.
        preview: draws a sample with the current concept, as a ComfyUI IMAGE; None: no previews.
        preview_every: steps between previews.
    """

    def __init__(self, node_id: str | None, label: str, total: int,
                 preview: Callable[[], Any] | None = None, preview_every: int = 0):
        self.node_id, self.label, self.total = node_id, label, total
        self.preview, self.preview_every = preview, preview_every
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.start, self.first = time.perf_counter(), None
        self.log_every = max(1, total // 20)
        if node_id is not None:
            LOSS_HISTORY[node_id] = {"label": label, "total": total, "steps": [], "losses": [], "running": True}

    def __call__(self, step: int, total: int, loss: float) -> None:
        mm.throw_exception_if_processing_interrupted()  # Cancel, even where no progress hook is installed
        if self.first is None:  # rates count from the first step seen (a resumed run starts late)
            self.first, self.start = step - 1, time.perf_counter()
        elapsed = time.perf_counter() - self.start
        rate = (step - self.first) / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / rate if rate > 0 else 0.0
        line = f"step {step}/{total} · loss {loss:.4f} · {rate:.2f} it/s · ETA {format_duration(eta)}"
        if step % self.log_every == 0 or step == total:
            log.info("Concept Forge: %s %s", self.label, line)
        if self.node_id is not None:
            history = LOSS_HISTORY[self.node_id]
            history["steps"].append(step)
            history["losses"].append(loss)
            history["running"] = step < total
        server = _server()
        if server is not None and self.node_id is not None:
            server.send_sync(LOSS_EVENT, {"node": self.node_id, "step": step, "total": total, "loss": loss},
                             server.client_id)
            server.send_progress_text(line, self.node_id)
        image = None
        if self.preview is not None and self.preview_every and step % self.preview_every == 0:
            image = ("JPEG", to_pil(self.preview()), 512)
        self.bar.update_absolute(step, total, image)  # last: its hook may raise for Cancel

    def finish(self) -> None:
        if self.node_id in LOSS_HISTORY:
            LOSS_HISTORY[self.node_id]["running"] = False

    @staticmethod
    def say(node_id: str | None, text: str) -> None:
        """Show `text` on the node (the progress text line)."""
        server = _server()
        if server is not None and node_id is not None:
            server.send_progress_text(text, node_id)
