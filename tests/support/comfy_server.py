"""A headless ComfyUI (`main.py --cpu`) with the pack installed, for the server tier (COMFYUI.md §8.3).

The base folder is a temporary one: the demo checkpoint and images are written into it, the pack is linked into
a custom_nodes folder given through --extra-model-paths-config, and nothing touches the ComfyUI checkout.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp

PACK = Path(__file__).resolve().parents[2]
FINAL = ("execution_success", "execution_error", "execution_interrupted")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui: str, root: Path):
        from concept_forge.nodes.demo import (
            DEMO_CHECKPOINT,
            write_demo_checkpoint,
            write_demo_embedding,
            write_demo_images,
        )

        self.base = root / "base"
        for folder in ("custom_nodes", "input", "output", "models/checkpoints", "models/embeddings"):
            (self.base / folder).mkdir(parents=True, exist_ok=True)
        write_demo_checkpoint(self.base / "models" / "checkpoints" / DEMO_CHECKPOINT)
        write_demo_images(self.base / "input")
        write_demo_embedding(self.base / "models" / "embeddings")
        packs = root / "packs"
        packs.mkdir(exist_ok=True)
        (packs / "concept_forge").symlink_to(PACK, target_is_directory=True)
        extra = root / "extra_model_paths.yaml"
        extra.write_text(f"concept_forge_tests:\n    custom_nodes: {packs}\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "server.log"
        self._log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--extra-model-paths-config", str(extra),
             "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=comfyui, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited during start-up:\n{self.log()}")
            try:
                urllib.request.urlopen(f"{self.url}/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not start within 120 s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(f"{self.url}{path}", data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=30) as r:
            text = r.read()
        return json.loads(text) if text else None

    def history(self, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
        """The finished prompt's history; the worker writes it just after announcing success, so wait for it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"no history for {prompt_id}")

    def run(self, prompt: dict[str, Any], on_message: Any = None, timeout: float = 300) -> tuple[str, list[dict]]:
        """Queue `prompt` and follow the websocket until it ends; returns the final event and every message."""
        return asyncio.run(self._run(prompt, on_message, timeout))

    async def _run(self, prompt: dict[str, Any], on_message: Any, timeout: float) -> tuple[str, list[dict]]:
        client_id = str(uuid.uuid4())
        messages: list[dict] = []
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(f"{self.url}/ws?clientId={client_id}") as ws:
                async with session.post(f"{self.url}/prompt", json={"prompt": prompt, "client_id": client_id}) as r:
                    queued = await r.json()
                    if r.status != 200:
                        raise RuntimeError(f"prompt refused: {queued}")
                prompt_id = queued["prompt_id"]
                deadline = time.time() + timeout
                while time.time() < deadline:
                    msg = await ws.receive(timeout=deadline - time.time())
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # previews and progress text are binary
                    data = json.loads(msg.data)
                    messages.append(data)
                    if on_message is not None:
                        await asyncio.get_running_loop().run_in_executor(None, on_message, data)
                    if data["type"] in FINAL and data["data"].get("prompt_id") == prompt_id:
                        return data["type"], messages
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
