"""The one training loop every method shares (docs/DESIGN.md, "One loop for all methods").

It owns what no method should repeat: latents encoded once, prompt sampling, seeded noise and timesteps,
gradient accumulation, learning-rate scaling, the NaN guard, progress/cancel callbacks and a held-out loss.
A method contributes only its parameters, what the text encoders see, and its update rule.
"""

from __future__ import annotations

import copy
import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import TrainState, fingerprint_differences
from .host import Host
from .methods.base import Method

StepCallback = Callable[[int, int, float], None]  # (step, total steps, loss); raising from it cancels training
CheckpointCallback = Callable[[TrainState], None]


def scaled_learning_rate(base: float, batch_size: int, grad_accum: int) -> float:
    """The effective learning rate: base × batch size × accumulation steps.

    This is the `scale_lr` rule of official TI, DTI, BaTex and CatVersion (docs/METHODS.md §2b, §3b, §4b), so a
    method's per-sample default (TI 5e-3, DTI 0.01) keeps its meaning at any batch size.
    """
    return base * batch_size * grad_accum


@dataclass(frozen=True)
class LoopOptions:
    """
    Args:
        steps (`int`): optimizer steps; 0 keeps the method's starting point (the Tuning Encoder's prediction).
        learning_rate (`float`): the effective learning rate (see `scaled_learning_rate`).
        batch_size (`int`, defaults to 1): samples per forward pass.
        grad_accum (`int`, defaults to 1): forward passes per optimizer step.
        seed (`int`, defaults to 0): seeds every draw — images, flips, prompts, noise, timesteps.
        flip_p (`float`, defaults to 0.0): probability that a sample uses its horizontally flipped image.
        heldout_draws (`int`, defaults to 0): fixed (noise, timestep) pairs per image for the held-out loss
            reported before and after training; 0 skips it.
        heldout_every (`int`, defaults to 0): also record the held-out loss every this many steps, for
            convergence curves (`TrainResult.heldout_curve`); needs `heldout_draws`.
        checkpoint_every (`int`, defaults to 0): hand a `TrainState` to the checkpoint callback every this many
            steps and at the last one; 0 never does.
    """

    steps: int
    learning_rate: float
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    flip_p: float = 0.0
    heldout_draws: int = 0
    heldout_every: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be at least 0, got {self.steps}.")
        for name in ("batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        if not 0 <= self.flip_p <= 1:
            raise ValueError(f"flip_p must be in [0, 1], got {self.flip_p}.")


@dataclass(frozen=True)
class TrainingSet:
    """
    Args:
        images (`Tensor`): [N, H, W, 3] in 0..1 at the training resolution (see `trainers.data`).
        prompts (`Sequence[str]`): prompts with a `{}` slot: templates sampled per sample, or captions.
        per_image (`bool`, defaults to `False`): `prompts[i]` is image i's caption.
        masks (`Tensor`, *optional*): [N, H, W], 1 where the loss counts.
    """

    images: Tensor
    prompts: Sequence[str]
    per_image: bool = False
    masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.shape[0] == 0:
            raise ValueError("images: the training set is empty.")
        if not self.prompts:
            raise ValueError("prompts: no training prompts.")
        if self.per_image and len(self.prompts) != self.images.shape[0]:
            raise ValueError(f"captions: {len(self.prompts)} captions for {self.images.shape[0]} images.")


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean training loss per optimizer step
    heldout_before: float | None = None
    heldout_after: float | None = None
    heldout_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), from step 0


class ResumeMismatch(ValueError):
    """The checkpoint belongs to a run with other settings; continuing it would not give that run's result."""


def run_fingerprint(method: Method, data: TrainingSet, options: LoopOptions) -> dict[str, Any]:
    """What must be equal for a resumed run to continue exactly the run that was checkpointed."""
    def digest(*parts: bytes) -> str:
        return hashlib.sha256(b"".join(parts)).hexdigest()[:16]

    masks = b"" if data.masks is None else data.masks.detach().cpu().numpy().tobytes()
    fingerprint: dict[str, Any] = {"method": method.name, "seed": options.seed, "learning_rate": options.learning_rate,
                                   "batch_size": options.batch_size, "grad_accum": options.grad_accum,
                                   "flip_p": options.flip_p,
                                   "images": digest(data.images.detach().cpu().numpy().tobytes(), masks),
                                   "prompts": digest("\n".join(data.prompts).encode(), bytes([data.per_image]))}
    frozen = sorted(k for k, v in method.vectors().items() if not v.requires_grad)
    if frozen:  # some encoders' vectors are held (freeze_encoders); absent otherwise, as in older checkpoints
        fingerprint["frozen_encoders"] = frozen
    return fingerprint


class NonFiniteLoss(RuntimeError):
    """The loss or a gradient stopped being finite. The method's parameters keep the last finite state."""

    def __init__(self, step: int, learning_rate: float, value: float):
        self.step, self.learning_rate, self.value = step, learning_rate, value
        super().__init__(f"the loss became {value} at step {step} (learning rate {learning_rate:g}); training "
                         f"stopped and the parameters keep their state after step {step - 1}")


@dataclass(frozen=True)
class Draws:
    """The image, flip and prompt of each sample of one micro-batch. [B] each."""

    images: Tensor
    flips: Tensor
    prompts: Tensor


def seeded(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one independent stream of draws (images, flips, prompts, noise, ...) of a run's seed."""
    return torch.Generator(device).manual_seed(hash((seed, *stream)) & 0xFFFF_FFFF_FFFF)


class SamplePlan:
    """Which image, flip and prompt every sample of the run uses, a function of the seed and the sample's index.

    Images come from consecutive random permutations, so each is seen equally often (as an epoch would). Every
    micro-batch is drawn when asked for, from streams of its own, so memory does not grow with the run's length
    and a plan is a prefix of any longer plan of the same seed: a run cut short, or resumed, sees exactly the
    samples of an uninterrupted one.
    """

    def __init__(self, num_images: int, num_prompts: int, per_image: bool, batch_size: int, flip_p: float,
                 seed: int):
        self.num_images, self.num_prompts, self.per_image = num_images, num_prompts, per_image
        self.batch_size, self.flip_p, self.seed = batch_size, flip_p, seed
        self._epoch: tuple[int, Tensor] = (-1, torch.empty(0, dtype=torch.long))

    def _image(self, index: int) -> int:
        epoch, position = divmod(index, self.num_images)
        if self._epoch[0] != epoch:
            self._epoch = (epoch, torch.randperm(self.num_images, generator=seeded(self.seed, 0, epoch)))
        return int(self._epoch[1][position])

    def __getitem__(self, micro: int) -> Draws:
        first = micro * self.batch_size
        images = torch.tensor([self._image(first + i) for i in range(self.batch_size)])
        flips = torch.rand(self.batch_size, generator=seeded(self.seed, 1, micro)) < self.flip_p
        prompts = images.clone() if self.per_image else torch.randint(
            self.num_prompts, (self.batch_size,), generator=seeded(self.seed, 2, micro))
        return Draws(images, flips, prompts)


@dataclass
class _Encoded:
    latents: Tensor         # [2 or 1, N, C, h, w]: unflipped, then flipped
    masks: Tensor | None    # [2 or 1, N, h, w]


def _encode_training_set(host: Host, data: TrainingSet, flip: bool) -> _Encoded:
    """Run the VAE once per image (and once per flipped image), never per step."""
    views = [data.images, data.images.flip(2)] if flip else [data.images]
    with torch.no_grad():
        latents = torch.stack([host.encode_images(v) for v in views])
    masks = None
    if data.masks is not None:
        size = latents.shape[-2:]
        views_m = [data.masks, data.masks.flip(2)] if flip else [data.masks]
        masks = torch.stack([F.interpolate(m[:, None].float(), size=size, mode="area")[:, 0] for m in views_m])
        masks = masks.to(latents.device)
    return _Encoded(latents, masks)


@dataclass
class HeldOut:
    """Fixed (image, prompt, noise, timestep) draws: a loss that depends only on the concept's vectors."""

    images: Tensor
    prompts: list[Any]
    noise: Tensor
    timesteps: Tensor

    @classmethod
    def draw(cls, host: Host, encoded: _Encoded, prepared: Sequence[Any], per_image: bool, draws: int,
             seed: int) -> HeldOut:
        gen = seeded(seed, 3)  # its own stream: the same set whatever the run length
        n = encoded.latents.shape[1]
        images = torch.arange(n).repeat_interleave(draws)
        chosen = images if per_image else torch.randint(len(prepared), (len(images),), generator=gen)
        noise = torch.randn((len(images), *encoded.latents.shape[2:]), generator=gen)
        timesteps = torch.randint(host.num_timesteps, (len(images),), generator=gen)
        return cls(images, [prepared[i] for i in chosen.tolist()], noise.to(host.device), timesteps.to(host.device))

    @torch.no_grad()
    def loss(self, host: Host, encoded: _Encoded, vectors: dict[str, Tensor], batch_size: int) -> float:
        total = 0.0
        for start in range(0, len(self.images), batch_size):
            sl = slice(start, start + batch_size)
            idx = self.images[sl]
            mask = None if encoded.masks is None else encoded.masks[0, idx]
            cond = host.encode(self.prompts[sl], vectors)
            total += float(host.loss(encoded.latents[0, idx], cond, self.noise[sl], self.timesteps[sl], mask).sum())
        return total / len(self.images)


def train(method: Method, host: Host, data: TrainingSet, options: LoopOptions,
          on_step: StepCallback | None = None, on_checkpoint: CheckpointCallback | None = None,
          resume: TrainState | None = None, on_prepare: Callable[[str], None] | None = None) -> TrainResult:
    """Train `method` on `data` through `host`.

    Args:
        method (`Method`): the parameterization and update rule.
        host (`Host`): the model.
        data (`TrainingSet`): images and prompts.
        options (`LoopOptions`): steps, learning rate, batching, seed.
        on_step (`StepCallback`, *optional*): called after every optimizer step; an exception raised by it
            (ComfyUI's Cancel) propagates, leaving the method at its last completed step.
        on_checkpoint (`CheckpointCallback`, *optional*): receives the state every `options.checkpoint_every`
            steps (before `on_step`, so a cancelled step is already saved).
        resume (`TrainState`, *optional*): continue from this checkpoint; with the same settings the result
            equals an uninterrupted run's.
        on_prepare (`Callable[[str], None]`, *optional*): called with what comes next before each stage of the
            preparation (encoding the images, the held-out loss); an exception raised by it (Cancel) propagates.

    Raises:
        NonFiniteLoss: the loss or a gradient became NaN/inf; the method keeps its last finite parameters.
        ResumeMismatch: `resume` was made with other settings.
    """
    prepare = on_prepare or (lambda stage: None)
    prepare("encoding the images")
    encoded = _encode_training_set(host, data, options.flip_p > 0)
    vectors = method.vectors()
    num_vectors = next(iter(vectors.values())).shape[0] if vectors else 0
    prepared = [host.prepare_prompt(p, num_vectors) for p in data.prompts]
    noise_gen = seeded(options.seed, 4, device=host.device)
    plan = SamplePlan(len(data.images), len(prepared), data.per_image, options.batch_size, options.flip_p,
                      options.seed)
    heldout = (HeldOut.draw(host, encoded, prepared, data.per_image, options.heldout_draws, options.seed)
               if options.heldout_draws else None)
    result = TrainResult()
    optimizer = method.optimizer(options.learning_rate)
    fingerprint = run_fingerprint(method, data, options)
    first = 1
    if resume is not None:
        differences = fingerprint_differences(resume.fingerprint, fingerprint)
        if differences:
            raise ResumeMismatch("the checkpoint was made with other settings (" + "; ".join(differences) + ")")
        with torch.no_grad():
            for p, saved in zip(method.parameters(), resume.parameters, strict=True):
                p.copy_(saved.to(p))
        optimizer.load_state_dict(resume.optimizer)
        noise_gen.set_state(resume.noise_generator)
        result.losses, result.heldout_before, first = list(resume.losses), resume.heldout_before, resume.step + 1
        result.heldout_curve = [(int(s), float(v)) for s, v in resume.heldout_curve]
    elif heldout:
        prepare("the held-out loss before training")
        result.heldout_before = heldout.loss(host, encoded, method.vectors(), options.batch_size)
        result.heldout_curve.append((0, result.heldout_before))

    latent_shape = encoded.latents.shape[2:]
    for step in range(first, options.steps + 1):
        step_loss = torch.zeros((), device=encoded.latents.device)
        for micro in range((step - 1) * options.grad_accum, step * options.grad_accum):
            draws = plan[micro]
            idx, flip = draws.images.to(encoded.latents.device), draws.flips.long().to(encoded.latents.device)
            latents = encoded.latents[flip, idx]                                     # [B, C, h, w]
            mask = None if encoded.masks is None else encoded.masks[flip, idx]
            cond = host.encode([prepared[i] for i in draws.prompts.tolist()], method.vectors())
            noise = torch.randn((len(idx), *latent_shape), generator=noise_gen, device=host.device)
            timesteps = torch.randint(host.num_timesteps, (len(idx),), generator=noise_gen, device=host.device)
            loss = host.loss(latents, cond, noise, timesteps, mask).mean()
            reg = method.regularizer()
            # divide so that the accumulated gradient is the mean over all micro-batches, not their sum
            ((loss if reg is None else loss + reg) / options.grad_accum).backward()  # type: ignore[no-untyped-call]
            step_loss += loss.detach() / options.grad_accum
        finite = [step_loss.isfinite()] + [p.grad.isfinite().all() for p in method.parameters() if p.grad is not None]
        if not bool(torch.stack(finite).all()):  # the one sync point per step
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(step, options.learning_rate, float(step_loss))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(step_loss))
        if heldout and options.heldout_every and step % options.heldout_every == 0:
            result.heldout_curve.append((step, heldout.loss(host, encoded, method.vectors(), options.batch_size)))
        every = options.checkpoint_every
        if on_checkpoint is not None and every and (step % every == 0 or step == options.steps):
            on_checkpoint(TrainState(step, [p.detach().clone() for p in method.parameters()],
                                     copy.deepcopy(optimizer.state_dict()), noise_gen.get_state(), list(result.losses),
                                     result.heldout_before, fingerprint, list(result.heldout_curve)))
        if on_step is not None:
            on_step(step, options.steps, result.losses[-1])

    if heldout:
        result.heldout_after = heldout.loss(host, encoded, method.vectors(), options.batch_size)
    return result
