"""Where the Tuning Encoder's wall time per concept goes on the toy world: the whole node (prediction, 12 tuning
steps, the held-out loss of its summary) and, inside it, the one forward of the stock CLIP vision model.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/encoder_timing.py   # -> bench/results/toyworld_encoder/timing.json

The toy world's vision tower is 2 layers and 64 channels wide, but the stock Load CLIP Vision builds a ViT-L/14 (24
layers, 1024 wide) around it (bench/toyworld/vision.py), so its forward costs what a ViT-L's does on this CPU.
One thread, as the benchmark's cells run; medians over the benchmark concepts, each timed after a warm-up run. The
vision forward's share of the node's time is what carries over to the benchmark's own timings (taken on a machine
as busy as it was then).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from toyworld import benchmark, protocol, world  # noqa: E402

RESULT = benchmark.ROOT / "bench" / "results" / "toyworld_encoder" / "timing.json"


def main() -> None:
    torch.set_num_threads(1)
    benchmark.import_pack()
    benchmark.use_scratch_folders()
    import comfy.utils

    comfy.utils.set_progress_bar_enabled(False)
    from concept_forge.nodes.host import ComfyHost

    forwards: list[float] = []
    image_features = ComfyHost.image_features

    def timed_features(host: ComfyHost, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        features = image_features(host, images)
        forwards.append(time.perf_counter() - start)
        return features

    ComfyHost.image_features = timed_features  # type: ignore[method-assign]
    scorer, row = benchmark.Scorer(), protocol.ROWS["Tuning Encoder"]
    node, vision = [], []
    for concept in world.CONCEPTS.values():
        for timed in (False, True):  # the first run of each loads models and warms caches
            start = time.perf_counter()
            benchmark.learn(scorer, row, concept, 0, row.steps)
            if timed:
                node.append(time.perf_counter() - start)
                vision.append(forwards[-1])
        print(f"{concept.name}: node {node[-1]:.2f} s, of which the vision forward {vision[-1]:.2f} s", flush=True)
    rest = [n - v for n, v in zip(node, vision, strict=True)]
    out = {"concepts": len(node), "threads": 1, "node_s": statistics.median(node),
           "vision_forward_s": statistics.median(vision), "node_without_vision_s": statistics.median(rest),
           "vision_share": statistics.median(v / n for v, n in zip(vision, node, strict=True)),
           "per_concept": {"node_s": node, "vision_forward_s": vision}}
    RESULT.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "per_concept"}))


if __name__ == "__main__":
    main()
