"""torchrun entry for the pretraining test: the tuning encoder on tiny ComfyUI models, one shard per process."""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import conftest  # noqa: E402,F401 — registers the package as concept_forge
import tiny_comfy as tc  # noqa: E402
import torch  # noqa: E402
from concept_forge.nodes.encoder_pretraining import distributed, parse_args, train_on_folder  # noqa: E402
from concept_forge.nodes.host import ComfyHost  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--data")
parser.add_argument("--run-dir")
parser.add_argument("--steps")
parser.add_argument("--checkpoint-every", default="2")
ns = parser.parse_args()
# the product's own command line, so a new option reaches this test with its default
args = parse_args(["--data", ns.data, "--run-dir", ns.run_dir, "--steps", ns.steps,
                   "--checkpoint-every", ns.checkpoint_every, "--batch-size", "2", "--learning-rate", "1e-3",
                   "--rank", "2", "--hidden", "16", "--targets", "cross-attention k/v", "--code", "8",
                   "--resolution", "64", "--seed", "3"])
rank, world = distributed()
torch.set_num_threads(1)
vision = tc.tiny_clip_vision(str(args.run_dir.parent))
with torch.inference_mode(False), torch.enable_grad():
    with ComfyHost(tc.tiny_model("sd1"), tc.tiny_clip("sd1"), tc.tiny_vae(), "sd1", clip_vision=vision) as host:
        train_on_folder(host, args, rank, world)
print(f"rank {rank} of {world} done", flush=True)
os._exit(0)  # skip the gloo teardown races at interpreter exit
