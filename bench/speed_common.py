"""What the speed benchmark's workers share: sizes, step timing, memory probes and the result line.

Each worker runs one configuration in its own process (see bench/speed.py), so a peak it reports is its own.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

RESULT_PREFIX = "SPEED_RESULT "
INIT_WORD = "dog"        # one token in CLIP's vocabulary: one vector per encoder, as diffusers' --initializer_token
NUM_IMAGES = 4           # a typical few-shot training set
SEED = 0


@dataclass(frozen=True)
class Size:
    """One model size: the architecture the pack sees, the training resolution and its default device."""

    name: str
    arch: str            # the pack's Arch: "sd1", "sdxl", or a flow family
    resolution: int      # pixels; latents are resolution / 8
    device: str          # "cpu" or "cuda": where it runs unless --device says otherwise


SIZES = {
    "tiny": Size("tiny", "sd1", 64, "cpu"),       # tests/support/tiny_comfy.py: 1.06 M-parameter UNet, 32-wide CLIP
    "sd15": Size("sd15", "sd1", 512, "cuda"),     # SD 1.5's full UNet, CLIP-L and VAE, random weights
    "sdxl": Size("sdxl", "sdxl", 1024, "cuda"),   # SDXL base: UNet, CLIP-L + CLIP-G, VAE, random weights
    # the flow families' small models (nodes/demo_families.py), as the tests and the --demo runs build them
    "tiny-sd3": Size("tiny-sd3", "sd3", 64, "cpu"),
    "tiny-flux": Size("tiny-flux", "flux", 64, "cpu"),
    "tiny-lumina2": Size("tiny-lumina2", "lumina2", 64, "cpu"),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Wall time between consecutive marks; the marks up to `warmup` only start the clock.

    Marks are taken after a device synchronisation, so a step's time includes its queued kernels. When the
    warm-up ends, `on_warm` runs (the memory probe resets its peak there), outside any measured step.
    """

    def __init__(self, device: torch.device, warmup: int, on_warm: Callable[[], None] | None = None):
        self.device, self.warmup, self.on_warm = device, warmup, on_warm
        self.count = 0
        self.durations: list[float] = []
        self.first_steps: list[float] = []    # the warm-up steps; the first one carries one-time costs
        self.last = time.perf_counter()

    def mark(self) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.count += 1
        (self.first_steps if self.count <= self.warmup else self.durations).append(now - self.last)
        if self.count == self.warmup and self.on_warm is not None:
            self.on_warm()
        self.last = time.perf_counter()  # the probe's own cost is not part of the next step


class Memory:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size (RSS) on a CPU.

    `start_phase()` resets the high-water mark (kept in `lifetime_mb` first) so that `phase_peak_mb()` is the
    peak of what ran since: the measured steps, without the imports, model building and setup before them.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.lifetime_mb = 0.0
        self.resident_mb = 0.0

    def _current_mb(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / 2**20
        return _proc_status_mb("VmRSS") or 0.0

    def _peak_mb(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_status_mb("VmHWM")
        if hwm is not None:
            return hwm
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20

    def start_phase(self) -> None:
        self.lifetime_mb = max(self.lifetime_mb, self._peak_mb())
        self.resident_mb = self._current_mb()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass

    def phase_peak_mb(self) -> float:
        peak = self._peak_mb()
        self.lifetime_mb = max(self.lifetime_mb, peak)
        return peak

    def report(self) -> dict[str, Any]:
        steps_peak = self.phase_peak_mb()
        return {"memory_kind": "cuda_max_memory_allocated" if self.cuda else "peak_rss",
                "peak_mb": round(self.lifetime_mb, 1),        # the whole process, setup included
                "step_peak_mb": round(steps_peak, 1),          # during the measured steps
                "resident_before_steps_mb": round(self.resident_mb, 1)}


def _proc_status_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def step_stats(durations: Sequence[float]) -> dict[str, Any]:
    q = statistics.quantiles(durations, n=4) if len(durations) > 1 else [durations[0]] * 3
    return {"median_s": statistics.median(durations), "p25_s": q[0], "p75_s": q[2], "min_s": min(durations),
            "steps": len(durations), "step_times_s": [round(d, 5) for d in durations]}


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def emit(result: dict[str, Any]) -> None:
    """Hand the result to the parent: one line on stdout, whatever else the libraries printed."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available here; use --device cpu.")
    return torch.device(name)


def comfyui_path() -> str:
    path = os.environ.get("COMFYUI_PATH", "")
    if not os.path.isfile(os.path.join(path, "comfy", "sd.py")):
        raise RuntimeError(f"no ComfyUI at COMFYUI_PATH={path!r}; set it to a ComfyUI >= 0.3.64 checkout.")
    return path
