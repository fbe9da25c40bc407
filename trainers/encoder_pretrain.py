"""Pretraining the tuning encoder over a folder of images, on one process or many (torchrun, DDP; docs/METHODS.md §6).

Each step every process takes its shard of the batch, predicts an embedding and LoRA offsets for each image,
and scores them by the diffusion loss of that image under its own prediction (the offsets go through the host's
weight wrappers, swapped per image), plus E4T's L2 penalty on the embedding offset and the nearest-token
contrastive term (the tuning steps' term; the other images of the batch are negatives too). With `blend` < 1 each
image's loss goes through DATE's dual path, its hard prompt holding the nearest real token of its embedding.
DDP averages the encoder's gradients. Every draw (images, templates, noise, timesteps) is a function of (seed, step,
rank), so a run killed and resumed from its checkpoint ends where an uninterrupted run of the same seed ends. Plain
torch: the host is whatever the caller builds.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoint import TrainState, fingerprint_differences, load_state, save_state
from .host import Host
from .loop import seeded
from .methods.base import init_vectors
from .templates import OBJECT_TEMPLATES
from .tuning_encoder import TuningEncoder, check_mechanisms, contrastive_loss, hard_rows, save_encoder

Log = Callable[[str], None]


@dataclass(frozen=True)
class PretrainOptions:
    """
    Args:
        steps (`int`): optimizer steps.
        batch_size (`int`, defaults to 4): images per process per step.
        learning_rate (`float`, defaults to 1e-4): AdamW's (this pack's choice; E4T used 1.6e-5 at batch 16).
        offset_penalty (`float`, defaults to 1e-4): λ·‖Δ‖² on the predicted embedding offset. E4T pretrains with
            0.01, which on the toy world held the embedding at its class word (the displacement 0.1·Δ a concept
            needs costs ten times the diffusion loss); 1e-4 is E4T's tuning-time value.
        contrastive (`float`, defaults to 0.01): weight of the nearest-token contrastive term (this pack's); 0 = off.
        blend (`float`, defaults to 0.8): α of the dual path (`Host.set_dual_path`); 1 = off (this pack's choice,
            as the tuning's; the paper's α is not reported).
        checkpoint_every (`int`, defaults to 100): steps between checkpoints (and at the end).
        log_every (`int`, defaults to 10): steps between loss log lines.
        seed (`int`, defaults to 0): seeds every draw.
    """

    steps: int
    batch_size: int = 4
    learning_rate: float = 1e-4
    offset_penalty: float = 1e-4
    contrastive: float = 0.01
    blend: float = 0.8
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        check_mechanisms(self.blend, self.contrastive)


@dataclass
class Example:
    """One training image, encoded once: its latent [C, h, w], CLIP vision features [T, W] and class word, and the
    prompt template it is trained with (`{}`: the concept), or None for the object templates."""

    latent: Tensor
    vision: Tensor
    class_word: str
    template: str | None = None


Item = tuple[Path, str, "str | None"]  # (image, class word, prompt template or None)


def read_folder(root: str | os.PathLike[str]) -> list[Item]:
    """(image, class word, template) items: `root/<class word>/<image>`, or `root/captions.txt` lines
    `<image>\\t<class word>[\\t<prompt with {} for the concept>]` — a prompt that says what else the image shows
    ("a small {} on the left") keeps that out of the predicted embedding."""
    root = Path(root)
    captions = root / "captions.txt"
    if captions.exists():
        items: list[Item] = []
        for number, line in enumerate(captions.read_text().splitlines(), start=1):
            if line.strip():
                name, word, template = (line.split("\t") + ["", ""])[:3]
                if not word.strip() or (template and "{}" not in template):
                    raise ValueError(f"captions.txt line {number}: expected '<image>\\t<class word>' and optionally "
                                     f"'\\t<prompt with {{}}>', got {line!r}.")
                items.append((root / name.strip(), word.strip(), template.strip() or None))
        return items
    images = (".png", ".jpg", ".jpeg", ".webp")
    pairs: list[Item] = sorted((p, folder.name.replace("_", " "), None) for folder in root.iterdir()
                               if folder.is_dir() for p in folder.iterdir() if p.suffix.lower() in images)
    if not pairs:
        raise ValueError(f"{root}: no images; put them in one folder per class word, or list them in captions.txt.")
    return pairs


def shard(count: int, rank: int, world: int) -> list[int]:
    """The example indices a process owns: every world-th one, from its rank."""
    return list(range(rank, count, world))


def pretrain(host: Host, encoder: TuningEncoder, examples: Sequence[Example], options: PretrainOptions,
             run_dir: str | os.PathLike[str], rank: int = 0, world: int = 1, log: Log = print) -> TuningEncoder:
    """Train `encoder` on this process's `examples` (its shard); resumes from `run_dir` when a checkpoint is there.

    Writes (rank 0) `run_dir/state.safetensors` every `checkpoint_every` steps, `run_dir/encoder.safetensors` at
    each checkpoint and `run_dir/log.jsonl` lines of the loss.
    """
    run_dir = Path(run_dir)
    distributed = world > 1
    model: Any = encoder
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(encoder)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=options.learning_rate, weight_decay=0.0)
    fingerprint = {**asdict(options), "world": world, "examples": len(examples), "config": encoder.config.to_json()}
    fingerprint.pop("steps")
    fingerprint.pop("checkpoint_every")
    fingerprint.pop("log_every")
    first, losses = 1, []
    state_path = run_dir / "state.safetensors"
    if state_path.exists():
        state = load_state(state_path)
        differences = fingerprint_differences(state.fingerprint, fingerprint)
        if differences:
            raise ValueError(f"{state_path} belongs to another run: {'; '.join(differences)}")
        with torch.no_grad():
            for p, saved in zip(encoder.parameters(), state.parameters, strict=True):
                p.copy_(saved.to(p))
        optimizer.load_state_dict(state.optimizer)
        first, losses = state.step + 1, list(state.losses)
        log(f"resumed at step {state.step}")
    tables = {k: host.vocabulary(k) for k in host.encoders}
    class_rows = {word: _class_rows(host, word) for word in sorted({e.class_word for e in examples})}
    prompts = [host.prepare_prompt(t, 1) for t in OBJECT_TEMPLATES]
    captioned = {t: host.prepare_prompt(t, 1) for t in sorted({e.template for e in examples if e.template})}
    targets = [key for key, _, _ in encoder.config.targets]

    started = time.perf_counter()
    for step in range(first, options.steps + 1):
        gen = seeded(options.seed, step * 1009 + rank)  # a function of (seed, step, rank): resumable exactly
        chosen = torch.randint(len(examples), (options.batch_size,), generator=gen).tolist()
        batch = [examples[i] for i in chosen]
        latents = torch.stack([e.latent for e in batch]).to(host.device)                        # [B, C, h, w]
        noise = torch.randn(latents.shape, generator=gen).to(host.device)
        timesteps = torch.randint(host.num_timesteps, (len(batch),), generator=gen).to(host.device)
        template = torch.randint(len(prompts), (len(batch),), generator=gen).tolist()
        unet = host.unet_features(latents, noise, timesteps)
        vision = torch.stack([e.vision for e in batch]).to(host.device)
        rows = {k: torch.stack([class_rows[e.class_word][k] for e in batch]) for k in tables}     # [B, 1, d]
        prediction = model(vision, unet, rows)
        diffusion = torch.zeros((), device=host.device)
        for i in range(len(batch)):  # each image under its own predicted offsets and embedding
            host.wrap_unet_weights({key: (up[i], down[i]) for key, up, down in
                                    zip(targets, prediction.up, prediction.down, strict=True)}, scale=1.0)
            vectors = {k: e[i] for k, e in prediction.embeddings.items()}
            if options.blend < 1:
                host.set_dual_path(options.blend, _nearest(vectors, tables))
            own = batch[i].template
            cond = host.encode([prompts[template[i]] if own is None else captioned[own]], vectors)
            diffusion = diffusion + host.loss(latents[i:i + 1], cond, noise[i:i + 1], timesteps[i:i + 1]).sum()
        offsets = torch.cat([prediction.offsets[k] for k in sorted(prediction.offsets)], dim=-1)   # [B, Σd]
        penalty = options.offset_penalty * offsets.pow(2).sum(-1).mean()
        loss = diffusion / len(batch) + penalty
        if options.contrastive:
            loss = loss + options.contrastive * sum(contrastive_loss(e[:, 0], tables[k])
                                                    for k, e in prediction.embeddings.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        value = float(loss.detach())
        if distributed:
            total = torch.tensor([value], device=host.device)
            dist.all_reduce(total)
            value = float(total) / world
        losses.append(value)
        if rank == 0 and (step % options.log_every == 0 or step == options.steps):
            rate = (step - first + 1) * options.batch_size * world / (time.perf_counter() - started)
            log(f"step {step}/{options.steps} loss {value:.5f} ({rate:.1f} images/s)")
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": value, "images_per_s": rate}) + "\n")
        if options.checkpoint_every and (step % options.checkpoint_every == 0 or step == options.steps):
            if rank == 0:
                save_state(TrainState(step, [p.detach().clone() for p in encoder.parameters()],
                                      optimizer.state_dict(), torch.zeros(0, dtype=torch.uint8), losses, None,
                                      fingerprint), state_path)
                save_encoder(encoder, run_dir / "encoder.safetensors", {"step": str(step)})
            if distributed:
                dist.barrier()
    return encoder


def _nearest(vectors: Mapping[str, Tensor], tables: Mapping[str, Tensor]) -> Callable[[], dict[str, Tensor]]:
    """The hard prompt's vectors for one image: the vocabulary rows nearest its predicted embedding, fixed now."""
    hard = hard_rows(vectors, tables)
    return lambda: hard


def _class_rows(host: Host, word: str) -> dict[str, Tensor]:
    """The class word's single token row per encoder; pretraining batches need one row per image."""
    if len(host.token_ids(next(iter(host.encoders)), word)) != 1:
        raise ValueError(f"class word {word!r} is several tokens; pretraining needs one-token class words (name the "
                         "folder or the caption with a single word).")
    return init_vectors(host, word, 1)
