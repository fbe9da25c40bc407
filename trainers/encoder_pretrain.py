"""Pretraining the tuning encoder over a folder of images, on one process or many (torchrun, DDP; docs/METHODS.md §6).

Each step every process takes its shard of the batch, predicts an embedding and LoRA offsets for each image,
and scores them by the diffusion loss of that image under its own prediction (the offsets go through the host's
weight wrappers, swapped per image), plus E4T's L2 penalty on the embedding offset and the nearest-token
contrastive term (the tuning steps' term; the other images of the batch are negatives too). With `blend` < 1 each
image's loss goes through DATE's dual path, its hard prompt holding the nearest real token of its embedding.
When the images name their concept (captions.txt's fourth column), each concept also gets a code, an embedding
learned like Textual Inversion's on its own images, and the encoder's predicted embedding is regressed onto its
image's code (this pack's addition, `codes`): on the toy world the diffusion loss alone, seen through one noisy
image at a time, did not teach the encoder which features make a concept (docs/METHODS.md §6.3).
DDP averages the encoder's gradients. Every draw (images, templates, noise, timesteps) is a function of (seed, step,
rank), so a run killed and resumed from its checkpoint ends where an uninterrupted run of the same seed ends. Plain
torch: the host is whatever the caller builds.
"""

from __future__ import annotations

import json
import math
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
from .tuning_encoder import (
    CONTRASTIVE_K,
    CONTRASTIVE_TEMPERATURE,
    Prediction,
    TuningEncoder,
    check_mechanisms,
    contrastive_loss,
    hard_rows,
    save_encoder,
)

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
        contrastive_k (`int`, defaults to 3): its positives, the k nearest vocabulary rows (this pack's choice).
        contrastive_temperature (`float`, defaults to 0.07): its τ (this pack's choice).
        blend (`float`, defaults to 0.8): α of the dual path (`Host.set_dual_path`); 1 = off (this pack's choice,
            as the tuning's; the paper's α is not reported).
        checkpoint_every (`int`, defaults to 100): steps between checkpoints (and at the end).
        log_every (`int`, defaults to 10): steps between loss log lines.
        codes (`float`, defaults to 1.0): weight of the regression ‖e − (E[class] + code)‖² of each predicted
            embedding e onto its concept's code; 0 = off, and off when no image names its concept.
        code_learning_rate (`float`, defaults to 5e-3): AdamW's for the codes (the pack's TI rate per sample).
        max_grad_norm (`float`, defaults to 1.0): the gradients' total norm is clipped to this (diffusers' training
            scripts' default); 0 = no clipping. A step whose gradients are not finite is skipped either way.
        seed (`int`, defaults to 0): seeds every draw.
    """

    steps: int
    batch_size: int = 4
    learning_rate: float = 1e-4
    offset_penalty: float = 1e-4
    contrastive: float = 0.01
    contrastive_k: int = CONTRASTIVE_K
    contrastive_temperature: float = CONTRASTIVE_TEMPERATURE
    blend: float = 0.8
    checkpoint_every: int = 100
    log_every: int = 10
    codes: float = 1.0
    code_learning_rate: float = 5e-3
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_mechanisms(self.blend, self.contrastive, self.contrastive_k, self.contrastive_temperature)
        if not self.codes >= 0:
            raise ValueError(f"codes must be at least 0, got {self.codes}.")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be at least 0 (0: no clipping), got {self.max_grad_norm}.")


@dataclass
class Example:
    """One training image, encoded once: its latent [C, h, w], CLIP vision features [T, W] and class word, the
    prompt template it is trained with (`{}`: the concept; None: the object templates) and the concept it shows
    (None: not named)."""

    latent: Tensor
    vision: Tensor
    class_word: str
    template: str | None = None
    concept: str | None = None


Item = tuple[Path, str, "str | None", "str | None"]  # (image, class word, prompt template, concept)


def read_folder(root: str | os.PathLike[str]) -> list[Item]:
    """(image, class word, template, concept) items: `root/<class word>/<image>`, or `root/captions.txt` lines
    `<image>\\t<class word>[\\t<prompt with {} for the concept>[\\t<concept>]]` — a prompt that says what else
    the image shows ("a small {} on the left") keeps that out of the predicted embedding; images with the same
    concept name show the same thing (one object, one person), which gives that concept a code (`codes`)."""
    root = Path(root)
    captions = root / "captions.txt"
    if captions.exists():
        items: list[Item] = []
        for number, line in enumerate(captions.read_text().splitlines(), start=1):
            if line.strip():
                name, word, template, concept = (line.split("\t") + ["", "", ""])[:4]
                if not word.strip() or (template and "{}" not in template):
                    raise ValueError(f"captions.txt line {number}: expected '<image>\\t<class word>' and optionally "
                                     f"'\\t<prompt with {{}}>\\t<concept>', got {line!r}.")
                items.append((root / name.strip(), word.strip(), template.strip() or None, concept.strip() or None))
        return items
    images = (".png", ".jpg", ".jpeg", ".webp")
    pairs: list[Item] = sorted((p, folder.name.replace("_", " "), None, None) for folder in root.iterdir()
                               if folder.is_dir() for p in folder.iterdir() if p.suffix.lower() in images)
    if not pairs:
        raise ValueError(f"{root}: no images; put them in one folder per class word, or list them in captions.txt.")
    return pairs


def shard(count: int, rank: int, world: int) -> list[int]:
    """The example indices a process owns: every world-th one, from its rank."""
    return list(range(rank, count, world))


def pretraining_metadata(options: PretrainOptions, world: int, **facts: Any) -> dict[str, str]:
    """The encoder file's record of how it was pretrained (an encoder can then be told from its ablations)."""
    return {"pretraining": json.dumps({**asdict(options), "processes": world, **facts}, sort_keys=True)}


def visible_devices(environ: Mapping[str, str]) -> str | None:
    """CUDA_VISIBLE_DEVICES for one torchrun process, from its environment: its own GPU among those the user made
    visible (all, when unset), so that ranks never share a card. Hidden GPUs (empty, -1, NoDevFiles: a CPU run) stay
    hidden; outside torchrun None (nothing to change)."""
    if "TORCHELASTIC_RUN_ID" not in environ:
        return None
    visible, local_rank = environ.get("CUDA_VISIBLE_DEVICES"), int(environ.get("LOCAL_RANK", "0"))
    if visible is None:
        return str(local_rank)
    if visible.strip() in ("", "-1", "NoDevFiles"):
        return visible
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    needed = max(int(environ.get("LOCAL_WORLD_SIZE", "1")), local_rank + 1)
    if len(devices) < needed:
        raise ValueError(f"torchrun started {needed} processes on this machine but CUDA_VISIBLE_DEVICES lists "
                         f"{len(devices)} GPU(s) ({visible}); give --nproc_per_node {len(devices)}, or list one "
                         "GPU per process.")
    return devices[local_rank]


class Trainee(torch.nn.Module):
    """What pretraining updates: the encoder and, per named concept, its code [concepts, d] per text encoder (one
    module, so that DDP averages both)."""

    def __init__(self, encoder: TuningEncoder, concepts: int):
        super().__init__()
        self.encoder = encoder
        self.codes = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.zeros(concepts, w))
                                             for k, w in encoder.config.text_widths.items()} if concepts else {})

    def forward(self, vision: Tensor, unet: Tensor, rows: Mapping[str, Tensor]) -> Prediction:
        prediction: Prediction = self.encoder(vision, unet, rows)
        return prediction


def pretrain(host: Host, encoder: TuningEncoder, examples: Sequence[Example], options: PretrainOptions,
             run_dir: str | os.PathLike[str], rank: int = 0, world: int = 1, log: Log = print,
             concepts: Sequence[str] | None = None, facts: Mapping[str, Any] | None = None) -> TuningEncoder:
    """Train `encoder` on this process's `examples` (its shard); resumes from `run_dir` when a checkpoint is there.

    `concepts` names every concept of the whole folder (all shards), in one order on every process; by default
    those of `examples`. `facts` (the data, its size...) join the options in the encoder file's record of how it was
    made. Writes (rank 0) `run_dir/state.safetensors` every `checkpoint_every` steps,
    `run_dir/encoder.safetensors` at each checkpoint and `run_dir/log.jsonl` lines of the loss.
    """
    run_dir = Path(run_dir)
    distributed = world > 1
    names = list(concepts if concepts is not None else sorted({e.concept for e in examples if e.concept}))
    coded = options.codes > 0 and bool(names)
    code_index = {name: i for i, name in enumerate(names)}
    trainee = Trainee(encoder, len(names) if coded else 0).to(next(encoder.parameters()).device)
    model: Any = torch.nn.parallel.DistributedDataParallel(trainee) if distributed else trainee
    groups: list[dict[str, Any]] = [{"params": list(encoder.parameters())},
                                    {"params": list(trainee.codes.parameters()), "lr": options.code_learning_rate}]
    optimizer = torch.optim.AdamW(groups, lr=options.learning_rate, weight_decay=0.0)
    fingerprint = {**asdict(options), "world": world, "examples": len(examples), "config": encoder.config.to_json(),
                   "concepts": len(names) if coded else 0}
    for free in ("steps", "checkpoint_every", "log_every", "max_grad_norm"):  # a resumed run may change these (a
        fingerprint.pop(free)                                                    # diverging one: clip harder)
    first, losses = 1, []
    state_path = run_dir / "state.safetensors"
    if state_path.exists():
        state = load_state(state_path)
        differences = fingerprint_differences(state.fingerprint, fingerprint)
        if differences:
            raise ValueError(f"{state_path} belongs to another run: {'; '.join(differences)}")
        with torch.no_grad():
            for p, saved in zip(trainee.parameters(), state.parameters, strict=True):
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
        regression = torch.zeros((), device=host.device)
        for i in range(len(batch)):  # each image under its own predicted offsets and embedding
            own = batch[i].template
            prompt = [prompts[template[i]] if own is None else captioned[own]]
            ups = [up[i] for up in prediction.up]
            host.wrap_unet_weights({key: (up, down[i]) for key, up, down in
                                    zip(targets, ups, prediction.down, strict=True)}, scale=1.0)
            vectors = {k: e[i] for k, e in prediction.embeddings.items()}
            host.set_dual_path(options.blend, _nearest(vectors, tables) if options.blend < 1 else None)
            diffusion = diffusion + host.loss(latents[i:i + 1], host.encode(prompt, vectors), noise[i:i + 1],
                                              timesteps[i:i + 1]).sum()
            if coded and batch[i].concept is not None:  # the code learns as TI would: base weights, one path
                index = code_index[batch[i].concept]
                code = {k: rows[k][i] + trainee.codes[k][index] for k in rows}                   # [1, d]
                host.wrap_unet_weights({key: (torch.zeros_like(up), down[i].detach()) for key, up, down in
                                        zip(targets, ups, prediction.down, strict=True)}, scale=1.0)
                host.set_dual_path(1.0, None)
                diffusion = diffusion + host.loss(latents[i:i + 1], host.encode(prompt, code), noise[i:i + 1],
                                                  timesteps[i:i + 1]).sum()
                regression = regression + sum(((vectors[k] - code[k].detach()) ** 2).sum() for k in code)
        offsets = torch.cat([prediction.offsets[k] for k in sorted(prediction.offsets)], dim=-1)   # [B, Σd]
        penalty = options.offset_penalty * offsets.pow(2).sum(-1).mean()
        loss = (diffusion + options.codes * regression) / len(batch) + penalty
        if coded:  # every code in the graph, also when this shard's batch names none (DDP reduces them all)
            loss = loss + 0 * sum(c.sum() for c in trainee.codes.values())
        if options.contrastive:
            loss = loss + options.contrastive * sum(contrastive_loss(e[:, 0], tables[k], options.contrastive_k,
                                                                     options.contrastive_temperature)
                                                    for k, e in prediction.embeddings.items())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        # after backward DDP's gradients are every rank's mean, so every rank clips and skips alike
        norm = torch.nn.utils.clip_grad_norm_(trainee.parameters(), options.max_grad_norm or math.inf)
        if torch.isfinite(norm):
            optimizer.step()
        elif rank == 0:
            log(f"step {step}: the gradients are not finite; skipped (the parameters keep their last good values)")
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
                save_state(TrainState(step, [p.detach().clone() for p in trainee.parameters()],
                                      optimizer.state_dict(), torch.zeros(0, dtype=torch.uint8), losses, None,
                                      fingerprint), state_path)
                save_encoder(encoder, run_dir / "encoder.safetensors",
                             {"step": str(step), **pretraining_metadata(options, world, **(facts or {}))})
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
