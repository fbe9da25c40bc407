"""Stages 3 and 4 of the build: cached training data, then the UNet trained jointly with the CLIP text encoder.

Why train the CLIP: a frozen random 64-wide CLIP maps prompts that differ in one word to conditionings with
cosine 0.97–0.995, and the prototype's UNet learned colour and shape only slowly from that. Only the token rows
of words that occur in captions are trained (a gradient mask), so every other row, the hidden words "teal" and
"heart" included, keeps its random initialisation; the later methods keep the whole CLIP frozen.

The loss is ε-MSE through `BaseModel.apply_model` (sigma in, x0 out) with min-SNR-5 weighting, 10% of
captions dropped to "" for classifier-free guidance, and EMA weights (UNet and CLIP) as the result.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from . import world
from .judge import load_judge
from .models import (
    DEVICE,
    TOKEN_TABLE_KEY,
    WEIGHTS,
    encode_ids,
    load_clip,
    load_model,
    load_vae,
    make_trainable,
    save_weights,
    token_ids,
)
from .sampling import score_suite
from .train_vae import step_seed

CAPTIONS_PER_IMAGE = 4
UNCOND_P = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.999
UNET_LR, CLIP_LR, WARMUP = 6e-4, 3e-4, 300
CHECKPOINT_EVERY = 500
QUICK_SUITE = world.heldin_suite()[:16]     # the first 16 of the evaluation's 48 held-in prompts


@torch.no_grad()
def make_training_data(vae: Any, n: int, seed: int, path: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """n training images as SD1.5-scaled latents, CAPTIONS_PER_IMAGE captions each, and the captions' token ids."""
    start = time.time()
    pick = random.Random(seed)
    latents, labels, caption_of = [], [], []
    for first in range(0, n, 2000):   # chunks keep memory flat
        images, _, lab, attrs = world.make_images(min(2000, n - first), step_seed(seed, first), training_only=True)
        latents.append(vae.encode(torch.from_numpy(images).float() / 255) * 0.18215)
        labels.append(torch.from_numpy(lab))
        caption_of += [[world.caption(a, pick) for _ in range(CAPTIONS_PER_IMAGE)] for a in attrs]
    captions = sorted({c for cs in caption_of for c in cs} | {world.EMPTY_CAPTION})
    index = {c: i for i, c in enumerate(captions)}
    clip = load_clip(path=None)     # only its tokenizer is used
    data = {"latents": torch.cat(latents).contiguous(), "labels": torch.cat(labels),
            "caption_index": torch.tensor([[index[c] for c in cs] for cs in caption_of]),
            "token_ids": torch.tensor([token_ids(clip, c) for c in captions])}
    save_file(data, str(path), metadata={"captions": json.dumps(captions)})
    stats = {"images": n, "unique_captions": len(captions), "seconds": time.time() - start,
             "latent_std": data["latents"].std().item(), "latent_mean": data["latents"].mean().item()}
    log(f"data: {json.dumps(stats)}")
    return stats


def trainable_clip_parameters(clip: Any) -> dict[str, torch.nn.Parameter]:
    """Everything that shapes the conditioning: token and position embeddings, layers, final LayerNorm."""
    return {k: p for k, p in clip.cond_stage_model.named_parameters()
            if not k.endswith("logit_scale") and "text_projection" not in k}


def caption_rows(token_table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[vocab, 1] mask of the token rows that captions use; gradients elsewhere are zeroed."""
    mask = torch.zeros(token_table.shape[0], 1)
    mask[ids.unique()] = 1
    return mask


def min_snr_weight(sigma: torch.Tensor) -> torch.Tensor:
    """ε-loss weight min(SNR, γ)/SNR with SNR = 1/σ² (Hang et al. 2023): down-weights the easy low-noise steps."""
    snr = sigma ** -2
    return snr.clamp(max=MIN_SNR_GAMMA) / snr


class Trainer:
    """The models, optimizer and EMA of one UNet + CLIP run, with safetensors checkpoints for resume."""

    def __init__(self, seed: int, data: dict[str, torch.Tensor]):
        self.seed = seed
        self.clip = load_clip(path=None, inference=False, seed=seed)
        self.model = load_model(path=None, inference=False, seed=seed + 1)
        self.base = self.model.model.to(DEVICE)
        self.clip.cond_stage_model.to(DEVICE)
        make_trainable(self.clip)
        self.clip_params = trainable_clip_parameters(self.clip)
        self.unet_params = dict(self.base.diffusion_model.named_parameters())
        for p in [*self.clip_params.values(), *self.unet_params.values()]:
            p.requires_grad_(True)
        table = self.clip_params[TOKEN_TABLE_KEY]
        self.initial_table = table.detach().clone()
        self.row_mask = caption_rows(table, data["token_ids"]).to(DEVICE)
        table.register_hook(lambda grad: grad * self.row_mask)
        self.opt = torch.optim.AdamW([{"params": list(self.unet_params.values()), "lr": UNET_LR},
                                      {"params": list(self.clip_params.values()), "lr": CLIP_LR}], weight_decay=0.0,
                                     foreach=True)
        self.ema = {f"unet.{k}": p.detach().clone() for k, p in self.unet_params.items()}
        self.ema.update({f"clip.{k}": p.detach().clone() for k, p in self.clip_params.items()})
        self.step = 0

    def loss(self, data: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step_seed(self.seed, self.step))   # drawn on the CPU: same on any device
        n = data["latents"].shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=g)
        caption = data["caption_index"][idx, torch.randint(0, CAPTIONS_PER_IMAGE, (batch_size,), generator=g)]
        caption = torch.where(torch.rand(batch_size, generator=g) < UNCOND_P, data["empty"], caption)
        unique, inverse = caption.unique(return_inverse=True)
        cond = encode_ids(self.clip, data["token_ids"][unique].to(DEVICE))[inverse.to(DEVICE)]   # each caption once
        x0 = data["latents"][idx].to(DEVICE)
        noise = torch.randn(x0.shape, generator=g).to(DEVICE)
        ms = self.base.model_sampling
        sigma = ms.sigma(torch.randint(0, 1000, (batch_size,), generator=g).float().to(DEVICE))
        xt = ms.noise_scaling(sigma, noise, x0)
        eps = (xt - self.base.apply_model(xt, sigma, c_crossattn=cond)) / sigma.view(-1, 1, 1, 1)
        return (min_snr_weight(sigma) * ((eps - noise) ** 2).mean((1, 2, 3))).mean()

    def train_step(self, data: dict[str, torch.Tensor], batch_size: int) -> float:
        lr_scale = min(1.0, (self.step + 1) / WARMUP)
        for group, lr in zip(self.opt.param_groups, (UNET_LR, CLIP_LR), strict=True):
            group["lr"] = lr * lr_scale
        loss = self.loss(data, batch_size)
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*self.unet_params.values(), *self.clip_params.values()], 1.0)
        self.opt.step()
        decay = min(EMA_DECAY, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            torch._foreach_lerp_([self.ema[k] for k, _ in self.named_params()],
                                 [p.detach() for _, p in self.named_params()], 1 - decay)
        self.step += 1
        return loss.detach()

    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"unet.{k}", p) for k, p in self.unet_params.items()] + \
               [(f"clip.{k}", p) for k, p in self.clip_params.items()]

    def ema_models(self) -> tuple[Any, Any]:
        """Fresh CLIP and MODEL objects holding the EMA weights (for sampling and for the weight files)."""
        clip = load_clip(path=None, inference=False, seed=self.seed)
        model = load_model(path=None, inference=False, seed=self.seed + 1)
        with torch.no_grad():
            for k, p in clip.cond_stage_model.named_parameters():
                if f"clip.{k}" in self.ema:
                    p.copy_(self.ema[f"clip.{k}"])
            for k, p in model.model.diffusion_model.named_parameters():
                p.copy_(self.ema[f"unet.{k}"])
        return clip, model

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": p.detach().cpu().contiguous() for k, p in self.named_params()}
        tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in self.ema.items()})
        opt = self.opt.state_dict()
        for i, state in opt["state"].items():
            tensors.update({f"opt.{i}.{k}": v.cpu().contiguous() for k, v in state.items()})
        save_file(tensors, str(folder / "state.safetensors"))
        (folder / "state.json").write_text(json.dumps({"step": self.step, "param_groups": opt["param_groups"]}))

    def restore(self, folder: Path) -> None:
        tensors = load_file(str(folder / "state.safetensors"))
        meta = json.loads((folder / "state.json").read_text())
        with torch.no_grad():
            for k, p in self.named_params():
                p.copy_(tensors[f"param.{k}"])
        self.ema = {k: tensors[f"ema.{k}"].to(DEVICE) for k in self.ema}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        self.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step = meta["step"]


def quick_eval(trainer: Trainer, vae: Any, judge: Any) -> dict[str, float]:
    clip, model = trainer.ema_models()
    result, _ = score_suite(model, clip, vae, judge, QUICK_SUITE, per_prompt=4)
    return result


def train_unet(steps: int, batch_size: int, seed: int, data: Path, state: Path, log: Callable[[str], None],
               eval_every: int, time_limit: float | None = None) -> dict[str, Any]:
    """Train (or resume) up to `steps` total steps, or until `time_limit` seconds have passed (a device lease is
    finite); writes EMA weights to weights/unet|clip.safetensors at every checkpoint and at the end."""
    tensors = load_file(str(data))
    captions = json.loads(_metadata(data)["captions"])
    tensors["empty"] = torch.tensor(captions.index(world.EMPTY_CAPTION))
    for word in world.HIDDEN_COLOURS | world.HIDDEN_SHAPES:
        if any(word in c.split() for c in captions):
            raise RuntimeError(f"hidden word {word!r} occurs in a caption")
    torch.manual_seed(seed)
    trainer = Trainer(seed, tensors)
    if (state / "state.json").exists():
        trainer.restore(state)
        log(f"resumed at step {trainer.step}")
    vae, judge = load_vae(), load_judge()
    start, first, recent, evals = time.time(), trainer.step, [], []
    while trainer.step < steps:
        recent.append(trainer.train_step(tensors, batch_size))
        s = trainer.step
        last = s == steps or (time_limit is not None and time.time() - start > time_limit)
        if s % 100 == 0:
            rate = (time.time() - start) / (s - first)
            log(f"unet step {s} loss {torch.stack(recent[-100:]).mean().item():.4f} ({rate:.3f} s/step)")
        if s % CHECKPOINT_EVERY == 0 or last:
            trainer.save(state)
            clip, model = trainer.ema_models()
            save_weights(clip.cond_stage_model, WEIGHTS / "clip.safetensors")
            save_weights(model.model.diffusion_model, WEIGHTS / "unet.safetensors")
        if s % eval_every == 0 or last:
            result = quick_eval(trainer, vae, judge)
            evals.append({"step": s, **result})
            log(f"quick held-in eval at step {s}: {json.dumps(result)}")
        if last:
            break
    table = trainer.ema[f"clip.{TOKEN_TABLE_KEY}"]
    untouched = trainer.row_mask[:, 0] == 0
    hidden = {w: token_ids(trainer.clip, w)[1:-1] for w in sorted(world.HIDDEN_COLOURS | world.HIDDEN_SHAPES)}
    hidden = {w: ids[:ids.index(49407)] if 49407 in ids else ids for w, ids in hidden.items()}
    return {"steps": trainer.step, "batch_size": batch_size, "seconds_this_run": time.time() - start,
            "final_loss": torch.stack(recent[-200:]).mean().item() if recent else None, "quick_evals": evals,
            "trained_token_rows": int(trainer.row_mask.sum().item()),
            "untouched_rows_unchanged": bool(torch.equal(table[untouched], trainer.initial_table[untouched])),
            "hidden_word_rows": {w: {"ids": ids, "trained": bool(trainer.row_mask[ids].any())}
                                 for w, ids in hidden.items()},
            "unet_params": sum(p.numel() for p in trainer.unet_params.values()),
            "unet_lr": UNET_LR, "clip_lr": CLIP_LR, "min_snr_gamma": MIN_SNR_GAMMA, "ema": EMA_DECAY}


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}
