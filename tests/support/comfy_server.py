"""A headless ComfyUI (`main.py --cpu`) with the pack installed, for the server tier (docs/COMFYUI.md §8.3).

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
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

PACK = Path(__file__).resolve().parents[2]
FINAL = ("execution_success", "execution_error", "execution_interrupted")
PROMPT_TIMEOUT = float(os.environ.get("CONCEPT_FORGE_PROMPT_TIMEOUT", 300))  # seconds a server-tier prompt may run


class PromptProgress:
    """How far a prompt got, from its websocket messages: the nodes started, and the running node's step."""

    def __init__(self, prompt: dict[str, Any]):
        self.prompt = prompt
        self.started: set[str] = set()
        self.node: str | None = None
        self.step: tuple[int, int] | None = None

    def update(self, message: dict[str, Any]) -> None:
        data = message.get("data", {})
        if message["type"] == "executing" and data.get("node"):
            self.node, self.step = str(data["node"]), None
            self.started.add(self.node)
        elif message["type"] == "progress":
            self.node, self.step = str(data["node"]), (data["value"], data["max"])

    def __str__(self) -> str:
        done = f"{len(self.started)} of its {len(self.prompt)} nodes had started"
        if self.node is None:
            return f"{done}; it was still queued"
        kind = self.prompt.get(self.node, {}).get("class_type", "?")
        step = f" at step {self.step[0]}/{self.step[1]}" if self.step else ""
        return f"{done}; node {self.node} ({kind}) was running{step}"


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

    def refusal(self, prompt: dict[str, Any]) -> list[str]:
        """Queue `prompt` expecting the server to refuse it; returns every error message, node by node."""
        request = urllib.request.Request(f"{self.url}/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                queued = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
            assert e.code == 400, body
            return [f"{error['message']}: {error['details']}" for node in body["node_errors"].values()
                    for error in node["errors"]] or [f"{body['error']['message']}: {body['error']['details']}"]
        self.post("/queue", {"delete": [queued["prompt_id"]]})
        self.wait_until_idle()
        raise AssertionError(f"the server accepted the prompt: {queued}")

    def history(self, prompt_id: str, timeout: float = 30) -> dict[str, Any]:
        """The finished prompt's history; the worker writes it just after announcing success, so wait for it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed"):
                return entry
            time.sleep(0.2)
        raise TimeoutError(f"no history for {prompt_id}")

    def run(self, prompt: dict[str, Any], what: str, on_message: Any = None,
            timeout: float = PROMPT_TIMEOUT) -> tuple[str, list[dict]]:
        """Queue `prompt` and follow the websocket until it ends; returns the final event and every message.

        A prompt still running after `timeout` seconds is interrupted, so the tests after it find an idle server,
        and the calling test fails with `what` and how far the prompt got.
        """
        self.wait_until_idle()
        progress = PromptProgress(prompt)
        outcome, messages, prompt_id = asyncio.run(self._run(prompt, on_message, timeout, progress))
        if outcome is None:
            self.post("/interrupt", {"prompt_id": prompt_id})
            self.post("/queue", {"delete": [prompt_id]})
            self.wait_until_idle()
            pytest.fail(f"{what}: the prompt did not finish within {timeout:.0f} s and was interrupted; "
                        f"{progress}", pytrace=False)
        return outcome, messages

    async def _run(self, prompt: dict[str, Any], on_message: Any, timeout: float,
                   progress: PromptProgress) -> tuple[str | None, list[dict], str]:
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
                while (left := deadline - time.time()) > 0:
                    try:
                        msg = await ws.receive(timeout=left)
                    except asyncio.TimeoutError:
                        break
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        raise RuntimeError(f"the server closed the websocket:\n{self.log()[-3000:]}")
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        continue  # previews and progress text are binary
                    data = json.loads(msg.data)
                    messages.append(data)
                    progress.update(data)
                    if on_message is not None:
                        await asyncio.get_running_loop().run_in_executor(None, on_message, data)
                    if data["type"] in FINAL and data["data"].get("prompt_id") == prompt_id:
                        return data["type"], messages, prompt_id
        return None, messages, prompt_id

    def wait_until_idle(self, timeout: float = 120) -> None:
        """Wait for the queue to empty, interrupting what runs (a test that stopped following its prompt)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            queue = self.get("/queue")
            if not queue["queue_running"] and not queue["queue_pending"]:
                return
            self.post("/queue", {"clear": True})
            self.post("/interrupt")
            time.sleep(0.5)
        raise RuntimeError(f"the server stayed busy for {timeout:.0f} s after an interrupt:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self._log.close()
