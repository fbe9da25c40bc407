"""The pack's side of the speed benchmark: ComfyUI models per size, a method's steps and the floor.

A method is measured through the pack's own code path: `create_method`, then `trainers.loop.train` on a
`ComfyHost`, exactly as Learn Concept calls them; the clock reads between `on_step` callbacks. The floor is
the same ComfyHost with nothing of a method: one batch of prepared prompts encoded with a leaf tensor as the
vectors, `host.loss`, backward — one CLIP forward+backward and one UNet forward+backward to its conditioning.

Models: "tiny" is tests/support/tiny_comfy.py (the ComfyUI test models); "tiny-sd3", "tiny-flux" and
"tiny-lumina2" are the flow families' small models (nodes/demo_families.py; TI, DTI and BaTex; no diffusers
baseline). "sd15" and "sdxl" are the full architectures built from ComfyUI's own classes (as nodes/demo.py builds
its checkpoint) directly on the target device, with random weights: a step's speed does not depend on the weights'
values.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from pack_import import import_pack
from speed_common import DTYPES, INIT_WORD, NUM_IMAGES, SEED, Memory, Size, StepClock, comfyui_path, step_stats

ROOT = Path(__file__).resolve().parents[1]

# ComfyUI's own detected configs (comfy/model_detection.py, unet_config_from_diffusers_unet: SD15 and SDXL).
SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                 use_temporal_resblock=False)
SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
                 use_temporal_resblock=False)
SD_VAE = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
              num_res_blocks=2, attn_resolutions=[], dropout=0.0)


def import_comfy(device: torch.device) -> None:
    """ComfyUI on sys.path, told to stay on the CPU when the benchmark does (before comfy.model_management)."""
    path = comfyui_path()
    if path not in sys.path:
        sys.path.insert(0, path)
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    from comfy.cli_args import args

    args.cpu = device.type == "cpu"
    import comfy.model_management  # noqa: F401  (reads args.cpu once, here)

    import_pack()


# -- models ------------------------------------------------------------------------------------------------------
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights drawn in place on their device (comfy.ops skips initialisation): matrices N(0, 1/fan_in), 1-D
    weights (norm scales) 1, biases 0 — the rule of nodes/demo.py, which keeps activations finite in fp16."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                g = generators.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
                p.normal_(0.0, 1.0 / max(1, p[0].numel()) ** 0.5, generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def full_size_models(size: Size, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    """MODEL, CLIP and VAE of SD 1.5 or SDXL from ComfyUI's classes, built under inference mode as ComfyUI's
    loaders run (so the host meets inference-tensor weights, as in a real graph)."""
    import comfy.ldm.models.autoencoder  # noqa: F401
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base

    sdxl = size.arch == "sdxl"
    with torch.inference_mode():
        config = (comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15)(
            dict(SDXL_UNET if sdxl else SD15_UNET))
        config.set_inference_dtype(dtype, None)
        base = config.get_model({}, device=device)
        randomise(base, SEED + 1)
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
        target = (comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
                  if sdxl else comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer,
                                                                        comfy.sd1_clip.SD1ClipModel))
        clip = comfy.sd.CLIP(target, model_options={"dtype": dtype, "initial_device": device})
        randomise(clip.cond_stage_model, SEED)
        logging.disable(logging.WARNING)  # an empty state dict makes ComfyUI list every VAE key as missing
        try:
            vae = comfy.sd.VAE(sd={}, config={"params": {"embed_dim": 4, "ddconfig": dict(SD_VAE)}})
        finally:
            logging.disable(logging.NOTSET)
        randomise(vae.first_stage_model, SEED + 2)
    return model, clip, vae


def comfy_models(size: Size, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, Any]:
    if size.name.startswith("tiny"):
        import tiny_comfy as tc

        channels = 16 if size.arch in tc.FLOW_ARCHS else 4
        return tc.tiny_model(size.arch), tc.tiny_clip(size.arch, dtype=dtype), tc.tiny_vae(latent_channels=channels)
    return full_size_models(size, device, dtype)


def parameter_counts(model: Any, clip: Any, vae: Any) -> dict[str, int]:
    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())
    return {"unet": count(model.model.diffusion_model), "text_encoders": count(clip.cond_stage_model),
            "vae": count(vae.first_stage_model)}


def training_images(size: Size, resolution: int) -> torch.Tensor:
    if size.name.startswith("tiny"):
        import tiny_comfy as tc

        return tc.tiny_images(NUM_IMAGES, resolution)
    return torch.rand(NUM_IMAGES, resolution, resolution, 3, generator=torch.Generator().manual_seed(SEED))


@contextlib.contextmanager
def comfy_host(spec: dict[str, Any], device: torch.device) -> Iterator[tuple[Any, dict[str, int]]]:
    from concept_forge.nodes.host import ComfyHost, detect_arch

    size = Size(**spec["size"])
    with torch.inference_mode(False), torch.enable_grad():
        model, clip, vae = comfy_models(size, device, DTYPES[spec["precision"]])
        counts = parameter_counts(model, clip, vae)
        arch = detect_arch(model, clip, "speed benchmark")
        with ComfyHost(model, clip, vae, arch, spec["precision"], spec["gradient_checkpointing"]) as host:
            yield host, counts


class TimedEncode:
    """Wraps `host.encode_images` to measure the loop's one-time latent encoding, without changing it."""

    def __init__(self, host: Any):
        self.encode, self.seconds = host.encode_images, 0.0
        self.device = host.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        latents = self.encode(images)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return latents


# -- workers -----------------------------------------------------------------------------------------------------
def floor_steps(host: Any, size: Size, spec: dict[str, Any], clock: StepClock) -> float:
    """The step with no method: prepared prompts encoded with leaf vectors, host.loss, backward; no optimizer.

    Returns the seconds its one latent encoding took.
    """
    from concept_forge.trainers.templates import OBJECT_TEMPLATES

    batch = spec["batch"]
    prompts = [host.prepare_prompt(OBJECT_TEMPLATES[i % len(OBJECT_TEMPLATES)], 1) for i in range(batch)]
    vectors = {}
    for key in host.encoders:  # the init word's row, as a leaf that receives the gradient
        row = host.vocabulary(key)[host.token_ids(key, INIT_WORD)[:1]]
        vectors[key] = row.detach().to(host.device, torch.float32).clone().requires_grad_(True)
    timed = TimedEncode(host)
    latents = timed(training_images(size, spec["resolution"])[:batch])
    generator = torch.Generator(host.device).manual_seed(SEED)
    clock.last = time.perf_counter()
    for _ in range(spec["warmup"] + spec["steps"]):
        cond = host.encode(prompts, vectors)
        noise = torch.randn(latents.shape, generator=generator, device=host.device)
        timesteps = torch.randint(host.num_timesteps, (batch,), generator=generator, device=host.device)
        host.loss(latents, cond, noise, timesteps).mean().backward()
        for v in vectors.values():
            v.grad = None
        clock.mark()
    return timed.seconds


def run_floor(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The floor alone in its process: its time and its peak memory."""
    import_comfy(device)
    memory = Memory(device)
    with comfy_host(spec, device) as (host, counts):
        clock = StepClock(device, spec["warmup"], memory.start_phase)
        encode_s = floor_steps(host, Size(**spec["size"]), spec, clock)
    return {**step_stats(clock.durations), **memory.report(), "method": "floor", "batch": spec["batch"],
            "grad_accum": 1, "samples_per_step": spec["batch"], "latent_encoding_s": encode_s, "parameters": counts}


def run_method(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One method through `trainers.loop.train`, after the floor on the same host (its paired floor).

    The paired floor runs first, in the same process and load window, before the method exists (CatVersion
    patches the CLIP when it is built); its median is the denominator of the step/floor ratio.
    """
    import_comfy(device)
    from concept_forge.trainers import loop
    from concept_forge.trainers.methods import create_method, method_options, method_prompts
    from concept_forge.trainers.templates import OBJECT_TEMPLATES

    memory = Memory(device)
    name, batch = spec["method"], spec["batch"]
    size = Size(**spec["size"])
    with comfy_host(spec, device) as (host, counts):
        floor_clock = StepClock(device, spec["warmup"])
        floor_steps(host, size, spec, floor_clock)
        timed = TimedEncode(host)
        host.encode_images = timed
        options = method_options(name)
        start = time.perf_counter()
        method = create_method(name, host, INIT_WORD, 0, options, SEED)
        build_s = time.perf_counter() - start
        data = loop.TrainingSet(training_images(size, spec["resolution"]),
                                method_prompts(name, list(OBJECT_TEMPLATES), False, INIT_WORD))
        learning_rate = loop.scaled_learning_rate(options.learning_rate, batch, 1)
        memory.start_phase()  # the method's peaks are its own, not the floor's
        clock = StepClock(device, spec["warmup"], memory.start_phase)
        loop.train(method, host, data, loop.LoopOptions(
            steps=spec["warmup"] + spec["steps"], learning_rate=learning_rate, batch_size=batch, seed=SEED,
            flip_p=options.flip_p), on_step=lambda *_: clock.mark())
        stats = step_stats(clock.durations)
    floor = step_stats(floor_clock.durations)
    # one-time cost of a run: building the method, then what `train` does before its first step's own work
    # (latent encoding, prompt preparation, sampling plan); the models are already on the device here
    setup_s = build_s + clock.first_steps[0] - stats["median_s"]
    return {**stats, **memory.report(), "method": name, "batch": batch, "grad_accum": 1, "samples_per_step": batch,
            "flip_p": options.flip_p, "learning_rate": learning_rate, "method_build_s": build_s,
            "latent_encoding_s": timed.seconds, "setup_s": max(setup_s, timed.seconds), "parameters": counts,
            "paired_floor": {k: v for k, v in floor.items() if k != "step_times_s"},
            "paired_floor_step_times_s": floor["step_times_s"]}
