"""The tuning encoder's pretraining as a command-line program, on one process or many (torchrun, DDP).

    torchrun --nproc_per_node 2 tools/pretrain_encoder.py --comfyui /path/to/ComfyUI \\
        --checkpoint v1-5-pruned-emaonly.safetensors --clip-vision CLIP-ViT-H-14.safetensors \\
        --data /path/to/images --run-dir runs/dogs --steps 20000 --out dogs_encoder

Models ComfyUI's checkpoint loader cannot read (the toy world's) come from `--loader FILE:FUNCTION` instead of
--checkpoint/--clip-vision: a function returning (MODEL, CLIP, VAE, CLIP_VISION).

`--data` holds one folder per class word (`dog/`, `mug/`, ...) or a `captions.txt` of `<image>\\t<class word>`, with
an optional third column, the image's prompt (`a small {} on the left`; `{}` is the concept), and an optional
fourth, the concept the image shows (images of one dog share a name): named concepts get codes the encoder's
prediction is regressed onto (`--codes`).
Each process encodes its shard of the images once (VAE latents, CLIP vision features), then trains; rank 0
writes checkpoints and the loss log to --run-dir, and a rerun of the same command resumes from them. The result
goes to models/concept_encoders/<out>.safetensors, where the Tuning Encoder node lists it. GPUs: one process per
GPU (each sees only its own); CPUs: the gloo backend.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch

from ..trainers.data import prepare_images
from ..trainers.encoder_pretrain import (
    Example,
    Item,
    PretrainOptions,
    pretrain,
    pretraining_metadata,
    read_folder,
    shard,
)
from ..trainers.host import Host
from ..trainers.tuning_encoder import (
    CONTRASTIVE_K,
    CONTRASTIVE_TEMPERATURE,
    HYPERNETWORKS,
    EncoderConfig,
    TuningEncoder,
    save_encoder,
    signature_image,
    vision_metadata,
)

PROBE_TIMESTEP = 500


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pretrain_encoder.py", description="Pretrain the Tuning Encoder.")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI folder ($COMFYUI_PATH)")
    ap.add_argument("--checkpoint", help="a checkpoint file (path, or a name in models/checkpoints)")
    ap.add_argument("--clip-vision", help="a CLIP vision file (path, or a name in models/clip_vision)")
    ap.add_argument("--loader", help="FILE:FUNCTION returning (MODEL, CLIP, VAE, CLIP_VISION), in place of "
                    "--checkpoint and --clip-vision")
    ap.add_argument("--data", type=Path, required=True, help="image folder: one subfolder per class word")
    ap.add_argument("--run-dir", type=Path, required=True, help="checkpoints and the loss log; reruns resume here")
    ap.add_argument("--out", default="", help="name of the encoder file in models/concept_encoders (none: keep it "
                    "only in the run dir)")
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=4, help="images per process per step")
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--rank", type=int, default=4, help="LoRA rank")
    ap.add_argument("--hidden", type=int, default=256, help="width of the encoder's trunk")
    ap.add_argument("--hypernetwork", choices=HYPERNETWORKS, default="offsets", help="what the hypernetwork predicts: "
                    "the LoRA factors per layer (offsets, DATE's) or r scales per layer over shared factors")
    ap.add_argument("--code", type=int, default=64, help="width of the offsets hypernetwork's shared bottleneck")
    ap.add_argument("--contrastive", type=float, default=0.01, help="weight of the nearest-token contrastive term "
                    "(0: off)")
    ap.add_argument("--contrastive-k", type=int, default=CONTRASTIVE_K, help="the contrastive term's positives: "
                    "the k nearest vocabulary rows of each predicted embedding")
    ap.add_argument("--contrastive-temperature", type=float, default=CONTRASTIVE_TEMPERATURE,
                    help="the contrastive term's τ")
    ap.add_argument("--blend", type=float, default=0.8, help="α of the dual path (1: off)")
    ap.add_argument("--offset-penalty", type=float, default=1e-4, help="λ of the L2 penalty on the predicted "
                    "embedding offset Δ (e = E[class] + 0.1·Δ)")
    ap.add_argument("--codes", type=float, default=1.0, help="weight of the regression of the predicted embedding "
                    "onto its concept's learned code (needs captions.txt's concept column; 0: off)")
    ap.add_argument("--code-learning-rate", type=float, default=5e-3, help="AdamW's learning rate for the codes")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradients' total norm to this "
                    "(0: no clipping); a step with non-finite gradients is skipped either way")
    ap.add_argument("--targets", default="attention q/k/v/out")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--checkpoint-every", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def encoder_for(host: Host, vision: torch.Tensor, latent: torch.Tensor, args: argparse.Namespace) -> TuningEncoder:
    """A new encoder shaped for this model: its feature widths come from one probe image."""
    noise = torch.zeros_like(latent)
    unet = host.unet_features(latent, noise, torch.tensor([PROBE_TIMESTEP], device=latent.device))
    config = EncoderConfig(vision.shape[-1], unet.shape[-1], {k: e.width for k, e in host.encoders.items()},
                           host.unet_targets(args.targets), args.rank, args.hidden, args.hypernetwork, args.code)
    return TuningEncoder(config, args.seed)


def examples_from(host: Host, items: list[Item], resolution: int) -> list[Example]:
    """Encode each image once: its VAE latent and its CLIP vision features."""
    import numpy as np
    from PIL import Image

    examples = []
    for path, word, template, concept in items:
        image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)[None]
        pixels = prepare_images(image, resolution)
        examples.append(Example(host.encode_images(pixels)[0], host.image_features(pixels)[0], word, template,
                                concept))
    return examples


def train_on_folder(host: Host, args: argparse.Namespace, rank: int, world: int
                    ) -> tuple[TuningEncoder, dict[str, str]]:
    """Everything but the models' loading: the shard, its examples, the encoder, the run. Returns the encoder and
    the metadata that records how it was made (its file keeps it, so an encoder can be told from its ablations)."""
    pairs = read_folder(args.data)
    mine = [pairs[i] for i in shard(len(pairs), rank, world)]
    examples = examples_from(host, mine, args.resolution)
    encoder = encoder_for(host, examples[0].vision[None], examples[0].latent[None], args).to(host.device)
    options = PretrainOptions(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                              offset_penalty=args.offset_penalty, contrastive=args.contrastive,
                              contrastive_k=args.contrastive_k, contrastive_temperature=args.contrastive_temperature,
                              blend=args.blend,
                              checkpoint_every=args.checkpoint_every, codes=args.codes,
                              code_learning_rate=args.code_learning_rate,
                              max_grad_norm=args.max_grad_norm, seed=args.seed)
    args.run_dir.mkdir(parents=True, exist_ok=True)
    concepts = sorted({concept for _, _, _, concept in pairs if concept})  # all shards', in one order
    facts = {"images": len(pairs), "concepts": len(concepts), "data": Path(args.data).name,
             "resolution": args.resolution}
    encoder = pretrain(host, encoder, examples, options, args.run_dir, rank, world,
                       log=lambda line: print(f"[rank {rank}] {line}", flush=True), concepts=concepts, facts=facts)
    return encoder, pretraining_metadata(options, world, **facts)


def distributed() -> tuple[int, int]:
    """(rank, world size), joining the torchrun group when there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.loader and not (args.checkpoint and args.clip_vision):
        print("Name the models: --checkpoint and --clip-vision, or --loader FILE:FUNCTION.")
        return 2
    if not args.comfyui or not Path(args.comfyui, "comfy", "sd.py").is_file():
        print("No ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH.")
        return 2
    from .headless import bootstrap

    bootstrap(args.comfyui, Path(args.comfyui), cpu=False)
    import comfy.clip_vision
    import comfy.sd
    import folder_paths

    from .host import ComfyHost, detect_arch
    from .paths import ENCODERS, register_model_folders

    rank, world = distributed()
    register_model_folders()
    if args.loader:
        model, clip, vae, clip_vision = _call(args.loader)
        source = args.loader
        vision_name = getattr(clip_vision, "name", args.loader)  # a loader's CLIP_VISION may name its file
    else:
        checkpoint = _model_file("checkpoints", args.checkpoint, folder_paths)
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            checkpoint, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        vision_file = _model_file("clip_vision", args.clip_vision, folder_paths)
        clip_vision = comfy.clip_vision.load(vision_file)
        source, vision_name = Path(checkpoint).name, Path(vision_file).name
    arch = detect_arch(model, clip, "pretrain_encoder")
    with torch.inference_mode(False), torch.enable_grad():
        with ComfyHost(model, clip, vae, arch, clip_vision=clip_vision) as host:
            encoder, made_with = train_on_folder(host, args, rank, world)
            signature_features = host.image_features(signature_image())
    if rank == 0 and args.out:
        out = Path(folder_paths.get_folder_paths(ENCODERS)[0]) / f"{args.out}.safetensors"
        save_encoder(encoder, out, {"checkpoint": source, **vision_metadata(vision_name, signature_features),
                                    **made_with})
        print(f"wrote {out}")
    return 0


def _call(spec: str) -> Any:
    """Call FUNCTION of the Python file FILE (`FILE:FUNCTION`)."""
    import importlib.util

    file, _, function = spec.rpartition(":")
    if not file or not Path(file).is_file():
        raise SystemExit(f"--loader {spec}: expected FILE:FUNCTION with an existing Python file.")
    module_spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, function)()


def _model_file(folder: str, name: str, folder_paths: Any) -> str:
    if os.path.isfile(name):
        return name
    return str(folder_paths.get_full_path_or_raise(folder, name))
