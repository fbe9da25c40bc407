"""The baseline users run instead: the training step of diffusers' examples/textual_inversion, reimplemented.

Source: huggingface/diffusers examples/textual_inversion/textual_inversion.py (SD 1.x/2.x) and
textual_inversion_sdxl.py (SDXL), `main()`'s training loop; the step below follows it line by line, minus
accelerate (not needed on one device) and minus what happens outside a step (logging, checkpoints, validation):
- the text encoder's whole token-embedding table is the trainable parameter (AdamW over every row), and the rows
  other than the placeholder's are copied back from a saved table after every micro-step;
- the VAE encodes the images at every step (`latent_dist.sample()`), `DDPMScheduler.add_noise` noises them;
- the UNet (`UNet2DConditionModel`) predicts ε and the loss is the MSE on the noise;
- mixed precision as accelerate applies it: VAE and UNet (and SDXL's second text encoder) are cast to the weight
  dtype, the trainable text encoder keeps fp32 weights and runs under autocast, fp16 uses a GradScaler;
- gradient accumulation as `accelerator.accumulate` does it: the loss is divided by the number of micro-steps
  and the optimizer steps on the last one; the table is restored on every micro-step, as the script does.
The dataset's per-sample work is kept (template choice, tokenisation to 77 tokens, PIL → array → [-1, 1], random
flip, collate, copy to the device); only reading and decoding the image file is left out.

The models are diffusers/transformers classes with configs equal to the ComfyUI models of each size (the
parameter counts are reported beside ComfyUI's), randomly initialised on the target device.
"""

from __future__ import annotations

import contextlib
import os
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pack_import import import_pack
from PIL import Image, ImageOps
from speed_common import DTYPES, INIT_WORD, NUM_IMAGES, SEED, Memory, Size, StepClock, comfyui_path, step_stats

import_pack()
# diffusers' imagenet_templates_small: the list its script trains objects with, and this pack too
from concept_forge.trainers.templates import OBJECT_TEMPLATES as TEMPLATES  # noqa: E402

PLACEHOLDER = "<concept>"


# -- models with the ComfyUI models' configs ------------------------------------------------------------------
def _clip_config(size: Size, which: str) -> Any:
    from transformers import CLIPTextConfig

    if size.name == "tiny":  # tests/support/tiny_comfy.py TE_L
        return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_hidden_layers=3, projection_dim=32, hidden_act="quick_gelu")
    if which == "g":         # OpenCLIP bigG, SDXL's text_encoder_2
        return CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                              num_hidden_layers=32, projection_dim=1280, hidden_act="gelu")
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                          num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu")


def _unet(size: Size) -> Any:
    from diffusers import UNet2DConditionModel

    if size.name == "tiny":  # tiny_comfy.tiny_model("sd1"): 32/64 channels, one res block per level, 2 heads
        return UNet2DConditionModel(sample_size=size.resolution // 8, block_out_channels=(32, 64), layers_per_block=1,
                                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=32)
    if size.arch == "sdxl":  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        return UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                    cross_attention_dim=2048, use_linear_projection=True,
                                    addition_embed_type="text_time", addition_time_embed_dim=256,
                                    projection_class_embeddings_input_dim=2816)
    # runwayml/stable-diffusion-v1-5 unet/config.json
    return UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                cross_attention_dim=768, attention_head_dim=8)


def _vae(size: Size) -> Any:
    from diffusers import AutoencoderKL

    tiny = size.name == "tiny"  # tiny_comfy.tiny_vae: ch 32, ch_mult 1,1,1,1, one res block
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(32,) * 4 if tiny else (128, 256, 512, 512),
                         layers_per_block=1 if tiny else 2,
                         latent_channels=4, sample_size=size.resolution,
                         scaling_factor=0.13025 if size.arch == "sdxl" else 0.18215)


def _tokenizer() -> Any:
    from transformers import CLIPTokenizer

    # the CLIP tokenizer files ComfyUI bundles (SD's tokenizer/); SD's model_max_length is 77
    return CLIPTokenizer.from_pretrained(os.path.join(comfyui_path(), "comfy", "sd1_tokenizer"), model_max_length=77)


# -- the dataset's per-sample work (TextualInversionDataset.__getitem__, minus Image.open) -----------------------
class Batches:
    def __init__(self, size: Size, resolution: int, tokenizers: list[Any], placeholder: str, device: torch.device):
        rng = np.random.default_rng(SEED)
        self.images = [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8))
                       for _ in range(NUM_IMAGES)]
        self.size, self.resolution, self.tokenizers = size, resolution, tokenizers
        self.placeholder, self.device = placeholder, device

    def example(self, i: int) -> dict[str, Any]:
        image = self.images[i % len(self.images)]
        text = random.choice(TEMPLATES).format(self.placeholder)
        ids = [t(text, padding="max_length", truncation=True, max_length=t.model_max_length,
                 return_tensors="pt").input_ids[0] for t in self.tokenizers]
        image = Image.fromarray(np.array(image).astype(np.uint8))
        example: dict[str, Any] = {"original_size": (image.height, image.width), "crop_top_left": (0, 0)}
        image = image.resize((self.resolution, self.resolution), resample=Image.Resampling.BICUBIC)
        if random.random() < 0.5:  # transforms.RandomHorizontalFlip(p=0.5)
            image = ImageOps.mirror(image)
        array = (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)
        example["pixel_values"] = torch.from_numpy(array).permute(2, 0, 1)
        for n, tokens in enumerate(ids, start=1):
            example[f"input_ids_{n}" if len(ids) > 1 else "input_ids"] = tokens
        return example

    def next(self, batch_size: int) -> dict[str, Any]:
        examples = [self.example(random.randrange(len(self.images))) for _ in range(batch_size)]
        batch: dict[str, Any] = {}
        for key, value in examples[0].items():  # torch's default_collate, then the prepared loader's .to(device)
            if torch.is_tensor(value):
                batch[key] = torch.stack([e[key] for e in examples]).to(self.device)
            else:
                batch[key] = [torch.tensor([e[key][j] for e in examples]) for j in range(len(value))]
        return batch


# -- the worker -------------------------------------------------------------------------------------------------
def run_diffusers(spec: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import diffusers
    from diffusers import DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    memory = Memory(device)
    size = Size(**spec["size"])
    sdxl = size.arch == "sdxl"
    batch_size, accum = spec["batch"], spec["grad_accum"]
    weight_dtype = DTYPES[spec["precision"]]
    mixed = weight_dtype != torch.float32
    random.seed(SEED)
    torch.manual_seed(SEED)

    tokenizer = _tokenizer()
    tokenizer.add_tokens([PLACEHOLDER])
    placeholder_ids = tokenizer.convert_tokens_to_ids([PLACEHOLDER])
    initializer_id = tokenizer.encode(INIT_WORD, add_special_tokens=False)[0]
    # SD's scheduler/scheduler_config.json
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear", prediction_type="epsilon")
    with torch.device(device):  # random initialisation on the target device
        text_encoder = CLIPTextModel(_clip_config(size, "l"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(size, "g")) if sdxl else None
        vae, unet = _vae(size), _unet(size)
    for frozen in (vae, unet, text_encoder_2):  # from_pretrained returns models in eval mode
        if frozen is not None:
            frozen.eval()
    counts = {"unet": sum(p.numel() for p in unet.parameters()),
              "text_encoders": sum(p.numel() for m in (text_encoder, text_encoder_2) if m is not None
                                   for p in m.parameters()),
              "vae": sum(p.numel() for p in vae.parameters())}
    # the new row is overwritten with the initializer's next; mean resizing would only cost setup time
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_embeds = text_encoder.get_input_embeddings().weight.data
    with torch.no_grad():
        for token_id in placeholder_ids:
            token_embeds[token_id] = token_embeds[initializer_id].clone()
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    if text_encoder_2 is not None:
        text_encoder_2.requires_grad_(False)
    text_model = getattr(text_encoder, "text_model", text_encoder)  # transformers >= 5 has no text_model wrapper
    text_model.encoder.requires_grad_(False)
    text_model.final_layer_norm.requires_grad_(False)
    text_model.embeddings.position_embedding.requires_grad_(False)
    if spec["gradient_checkpointing"]:
        text_encoder.gradient_checkpointing_enable()
        if not sdxl:  # the SDXL script checkpoints only the text encoder
            unet.train()
            unet.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-4 * batch_size * accum,
                                  betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scaler = torch.amp.GradScaler(device.type) if weight_dtype == torch.float16 else None
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    if text_encoder_2 is not None:
        text_encoder_2.to(device, dtype=weight_dtype)
    tokenizers = [tokenizer, _tokenizer()] if sdxl else [tokenizer]
    placeholder = " ".join(tokenizer.convert_ids_to_tokens(placeholder_ids))
    batches = Batches(size, spec["resolution"], tokenizers, placeholder, device)
    orig_embeds_params = text_encoder.get_input_embeddings().weight.data.clone()
    text_encoder.train()

    def encode_text(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        # accelerate.prepare wraps the trained text encoder's forward in autocast under mixed precision
        autocast = torch.autocast(device.type, dtype=weight_dtype) if mixed else contextlib.nullcontext()
        if not sdxl:
            with autocast:
                hidden = text_encoder(batch["input_ids"])[0]
            return hidden.to(dtype=weight_dtype), {}
        with autocast:
            hidden_1 = text_encoder(batch["input_ids_1"], output_hidden_states=True).hidden_states[-2]
        hidden_1 = hidden_1.to(dtype=weight_dtype)
        output_2 = text_encoder_2(batch["input_ids_2"].reshape(batch["input_ids_1"].shape[0], -1),
                                  output_hidden_states=True)
        hidden_2 = output_2.hidden_states[-2].to(dtype=weight_dtype)
        original_size = [(batch["original_size"][0][i].item(), batch["original_size"][1][i].item())
                          for i in range(batch_size)]
        crop_top_left = [(batch["crop_top_left"][0][i].item(), batch["crop_top_left"][1][i].item())
                         for i in range(batch_size)]
        target_size = (spec["resolution"], spec["resolution"])
        add_time_ids = torch.cat([torch.tensor(original_size[i] + crop_top_left[i] + target_size)
                                  for i in range(batch_size)]).to(device, dtype=weight_dtype)
        added = {"added_cond_kwargs": {"text_embeds": output_2[0], "time_ids": add_time_ids}}
        return torch.cat([hidden_1, hidden_2], dim=-1), added

    def micro_step(sync: bool) -> None:
        batch = batches.next(batch_size)
        latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample().detach()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device)
        timesteps = timesteps.long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states, extra = encode_text(batch)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, **extra).sample
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        scaled = loss / accum  # accelerator.backward under gradient accumulation
        (scaler.scale(scaled) if scaler else scaled).backward()
        if sync:  # the accelerate-wrapped optimizer only steps when gradients sync
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
        # "Let's make sure we don't update any embedding weights besides the newly added token"
        index_no_updates = torch.ones((len(tokenizer),), dtype=torch.bool)
        index_no_updates[min(placeholder_ids): max(placeholder_ids) + 1] = False
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight[index_no_updates] = orig_embeds_params[index_no_updates]
        loss.detach().item()  # logs = {"loss": loss.detach().item(), ...}

    clock = StepClock(device, spec["warmup"], memory.start_phase)
    for _ in range(spec["warmup"] + spec["steps"]):
        for micro in range(accum):
            micro_step(sync=micro == accum - 1)
        clock.mark()
    return {**step_stats(clock.durations), **memory.report(), "method": spec["method"], "batch": batch_size,
            "grad_accum": accum, "samples_per_step": batch_size * accum, "precision": spec["precision"],
            "diffusers": diffusers.__version__, "parameters": counts,
            "trainable_parameters": sum(p.numel() for p in text_encoder.parameters() if p.requires_grad)}
