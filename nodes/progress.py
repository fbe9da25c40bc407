"""Training progress in ComfyUI: the node's progress bar (which is also the Cancel check), a console line, the
step/loss text on the node and live `concept_forge.loss` events for the web chart (COMFYUI.md §5.5)."""

from __future__ import annotations

import logging
import time

import comfy.model_management as mm
import comfy.utils

LOSS_EVENT = "concept_forge.loss"
log = logging.getLogger("concept_forge")


def _server():
    try:
        from server import PromptServer
    except ImportError:  # a library import of the pack (tests, scripts) has no server
        return None
    return getattr(PromptServer, "instance", None)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class NodeProgress:
    """The loop's `on_step` for a node: called after every optimizer step."""

    def __init__(self, node_id: str | None, label: str, total: int):
        self.node_id, self.label, self.total = node_id, label, total
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.start = time.perf_counter()
        self.log_every = max(1, total // 20)

    def __call__(self, step: int, total: int, loss: float) -> None:
        mm.throw_exception_if_processing_interrupted()  # Cancel, even where no progress hook is installed
        elapsed = time.perf_counter() - self.start
        rate = step / elapsed if elapsed > 0 else 0.0
        eta = (total - step) / rate if rate > 0 else 0.0
        line = f"step {step}/{total} · loss {loss:.4f} · {rate:.2f} it/s · ETA {format_duration(eta)}"
        if step % self.log_every == 0 or step == total:
            log.info("Concept Forge: %s %s", self.label, line)
        server = _server()
        if server is not None and self.node_id is not None:
            server.send_sync(LOSS_EVENT, {"node": self.node_id, "step": step, "total": total, "loss": loss},
                             server.client_id)
            server.send_progress_text(line, self.node_id)
        self.bar.update_absolute(step, total)  # last: its hook may raise for Cancel
