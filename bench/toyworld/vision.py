"""The toy world's CLIP vision tower: a small ViT from ComfyUI's own clip_vision classes, shipped small and
installed as a file the stock Load CLIP Vision node loads.

Stock Load CLIP Vision recognises a file by its layer keys and builds a fixed configuration (ViT-L/14 at 224 px is
the smallest), so a small tower cannot be loaded as itself. It is trained here as a 64-wide, 2-layer ViT (patch
14, 224 px, ComfyUI's `CLIPVisionModelProjection`) whose residual stream is kept mean-zero over its channels:
every write to the stream (patch, class and position embeddings, attention out and MLP out projections) is
centred after each optimizer step, and the pre-LayerNorm is the identity affine. Then the ViT-L that holds the
small model in its first 64 channels (zeros elsewhere, LayerNorm scales times √(64/1024), the 22 other layers
with zero writes, so identities) computes the small model's stream exactly: a LayerNorm over 1024 channels of a
mean-zero vector padded with zeros is the 64-channel LayerNorm scaled by √(1024/64), when the small model's
LayerNorm ε is 1024/64 times the stock 1e-5. Its penultimate hidden states (layer 22) are the small model's
output (in fp32, to 3e-6; `install` writes the file in fp16, ~600 MB, so the stock model's features carry fp16
rounding of the weights as well) from the shipped 0.6 MB tower.

Trained supervised on the world's own attribute labels (colour, shape, size, position; linear heads over the mean
token) rather than contrastively against the world's text encoder: that encoder never learned "teal" or "heart",
and a real CLIP vision model has seen teal things and hearts. The benchmark concepts' colour × shape pairs are
in none of its training images.
"""

from __future__ import annotations

import functools
import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .models import COMFYUI_PATH, WEIGHTS, _load_into, _out_of_place, save_weights

STOCK_CONFIG = Path(COMFYUI_PATH, "comfy", "clip_vision_config_vitl.json")  # what the stock loader builds
STOCK = json.loads(STOCK_CONFIG.read_text())
STOCK_WIDTH = STOCK["hidden_size"]
HEAD_WIDTH = STOCK_WIDTH // STOCK["num_attention_heads"]  # a small tower's heads are as wide: they sit in ViT-L's


@dataclass(frozen=True)
class Tower:
    """A small tower: its file, its width (in heads of HEAD_WIDTH) and depth, and how it was built — `runs` of
    `steps` (batch 64), each continuing the last (the first continuing `start`'s weights, when given), with the
    given share of objects repainted in random colours, the shape loss weighted by `shape_weight`."""

    file: Path
    width: int
    layers: int
    runs: tuple[float, ...]
    steps: int
    start: Tower | None = None
    shape_weight: float = 1.0

    @property
    def config(self) -> dict[str, Any]:
        """Its config for ComfyUI's CLIPVisionModelProjection."""
        return dict(hidden_act="quick_gelu", hidden_size=self.width, image_size=224, intermediate_size=4 * self.width,
                    layer_norm_eps=1e-5, model_type="clip_vision_model", num_attention_heads=self.width // HEAD_WIDTH,
                    num_channels=3, num_hidden_layers=self.layers, patch_size=14)

    @property
    def stock_name(self) -> str:
        """The name of the stock ViT-L file that holds it (`install`)."""
        return f"toyworld_{self.file.stem}_vitl.safetensors"


# The first tower (1,800 steps) read shape at 0.79 on seen pairs and 0.39 on the benchmark's; training it on was
# what it lacked (a wider one, 128 × 4 layers in 2 heads, 800 steps, read no better: 0.76 / 0.41). SECOND is FIRST
# trained 2,400 steps more, shape weighted double. An encoder file names its tower, so both ship.
FIRST = Tower(WEIGHTS / "vision.safetensors", 64, 2, (0.0, 0.0, 0.5), 600)
SECOND = Tower(WEIGHTS / "vision2.safetensors", 64, 2, (0.5, 0.5), 1200, start=FIRST, shape_weight=2.0)
TOWERS = (FIRST, SECOND)
CURRENT = SECOND  # the one new encoders are pretrained with
BENCHMARK_PAIRS = frozenset((c.colour, c.shape) for c in world.CONCEPTS.values())
CENTRED = ("embeddings.patch_embedding.weight", "embeddings.class_embedding", "self_attn.out_proj.weight",
           "self_attn.out_proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def tower_named(stock_name: str | None) -> Tower:
    """The tower whose stock file is `stock_name` (what an encoder file names); FIRST for files that name none."""
    if stock_name is None:
        return FIRST
    for tower in TOWERS:
        if tower.stock_name == stock_name:
            return tower
    raise ValueError(f"no toy-world tower is installed as {stock_name}")


@functools.cache
def encoder_tower(encoder: Path) -> Tower:
    """The tower an encoder file names as the CLIP vision model it was pretrained with (the pack is imported)."""
    from concept_forge.trainers.tuning_encoder import load_encoder

    return tower_named(load_encoder(encoder).vision_name)


def small_model(seed: int = 0, tower: Tower = CURRENT) -> torch.nn.Module:
    """The trainable small tower (fp32, CPU), seeded, its stream writers centred."""
    import comfy.clip_model
    import comfy.ops

    from .models import _initialise

    with torch.inference_mode(False):
        model = comfy.clip_model.CLIPVisionModelProjection(tower.config, torch.float32, "cpu", comfy.ops.manual_cast)
        _initialise(model, seed)
    for layer in model.vision_model.encoder.layers:
        layer.forward = _out_of_place(layer)  # CLIPLayer adds its residuals in place, which autograd refuses
    for module in model.modules():  # the ε the ViT-L's LayerNorms amount to on the padded stream: exact equality
        if isinstance(module, torch.nn.LayerNorm):
            module.eps *= STOCK_WIDTH / tower.width
    pre = model.vision_model.pre_layrnorm
    pre.weight.requires_grad_(False)
    pre.bias.requires_grad_(False)
    centre(model)
    return model


@torch.no_grad()
def centre(model: torch.nn.Module) -> None:
    """Make every write to the residual stream mean-zero over the stream's channels (see the module docstring)."""
    for name, p in model.named_parameters():
        if name.endswith(CENTRED):
            p.sub_(p.mean(dim=0, keepdim=True))
        elif name.endswith("position_embedding.weight"):  # [tokens, channels]
            p.sub_(p.mean(dim=1, keepdim=True))


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 → the pixel values the stock CLIP vision model sees (resize, crop, normalise)."""
    import comfy.clip_vision

    return comfy.clip_vision.clip_preprocess(images, size=STOCK["image_size"], crop=True).float()


def tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, 257, 64]: the small tower's stream after its last layer — the stock ViT-L's penultimate hidden states."""
    return model(pixel_values=preprocess(images))[0]


def renders(n: int, seed: int, include_benchmark_pairs: bool, random_colour: float = 0.0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """n random scenes as an IMAGE batch and their labels [n, 4] (colour, shape, size, position). A share
    `random_colour` of the objects is repainted in a random RGB (colour label −100, no colour loss), so that shape
    is learned apart from the world's colours: its colour × shape pairs are not uniform once the benchmark's are
    left out, and a tower that reads shape through colour misreads exactly the unseen pairs."""
    pick, rng = random.Random(seed), np.random.default_rng(seed)
    images, labels = [], []
    while len(images) < n:
        attrs = (pick.choice(world.COLOUR_NAMES), pick.choice(world.SHAPES), pick.choice(world.SIZES),
                 pick.choice(world.POSITIONS))
        if not include_benchmark_pairs and attrs[:2] in BENCHMARK_PAIRS:
            continue
        image, mask = world.render(attrs, rng)
        label = world.labels_of(attrs)
        if pick.random() < random_colour:
            shift = rng.uniform(0, 255, 3) - np.array(world.COLOURS[attrs[0]], dtype=np.float64)
            image = np.clip(image + shift * mask[..., None], 0, 255).astype(np.uint8)
            label[0] = -100
        images.append(image)
        labels.append(label)
    return torch.from_numpy(np.stack(images)).float() / 255, torch.tensor(labels)


def train(tower: Tower, steps: int = 600, batch_size: int = 64, seed: int = 0, learning_rate: float = 2e-3,
          start: Path | None = None, random_colour: float = 0.0, scenes: int = 0,
          log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Supervised attribute heads on the mean token (from `start`'s tower weights when given, with new heads and a
    new schedule), on the scenes seeded from `scenes` on; returns the tower and its training stats."""
    model = small_model(seed, tower)
    if start is not None:
        _load_into(model, start)
    with torch.random.fork_rng():  # seeded heads: a tower's build is reproducible
        torch.manual_seed(seed)
        heads = torch.nn.ModuleList(torch.nn.Linear(tower.width, len(world.CLASSES[a])) for a in world.ATTRIBUTES)
    parameters = [p for p in model.parameters() if p.requires_grad] + list(heads.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) *
                                                 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    weights = [tower.shape_weight if a == "shape" else 1.0 for a in world.ATTRIBUTES]
    for step in range(steps):
        images, labels = renders(batch_size, seed * 100003 + scenes + step, include_benchmark_pairs=False,
                                 random_colour=random_colour)
        pooled = tokens(model, images).mean(dim=1)
        loss = sum(w * F.cross_entropy(head(pooled), labels[:, i])
                   for i, (w, head) in enumerate(zip(weights, heads, strict=True)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        centre(model)
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            log(f"vision step {step} loss {float(loss):.4f}")
    return model, {"steps": steps, "batch_size": batch_size, "seed": seed, "learning_rate": learning_rate,
                   "continued": start is not None, "random_colour": random_colour, "scenes": scenes,
                   "shape_weight": tower.shape_weight,
                   "final_loss": float(np.mean(losses[-20:]))}


def load_small(tower: Tower = CURRENT) -> torch.nn.Module:
    model = small_model(tower=tower)
    _load_into(model, tower.file)
    return model


# -- the stock file ------------------------------------------------------------------------------------------------
def stock_state_dict(small: torch.nn.Module, config: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The ViT-L/14 state dict (or one of another `config` as wide as STOCK_WIDTH, with heads as wide as the small
    model's) that computes `small` exactly in its first channels (see the module docstring)."""
    config = config or STOCK
    width, hidden = config["hidden_size"], config["intermediate_size"]
    layers = small.vision_model.encoder.layers
    d = small.vision_model.embeddings.patch_embedding.weight.shape[0]
    if width != STOCK_WIDTH or width // config["num_attention_heads"] != d // layers[0].self_attn.heads:
        raise ValueError("the padded model must be STOCK_WIDTH wide with heads as wide as the small model's")
    ln_scale = math.sqrt(d / width)
    src = {k: v.detach().float() for k, v in small.state_dict().items()}
    out: dict[str, torch.Tensor] = {}

    def put(key: str, shape: tuple[int, ...], value: torch.Tensor | None = None, fill: float = 0.0) -> None:
        tensor = torch.full(shape, fill)
        if value is not None:
            tensor[tuple(slice(0, s) for s in value.shape)] = value
        out[key] = tensor

    def norm(key: str, source: str | None) -> None:
        put(f"{key}.weight", (width,), None if source is None else src[f"{source}.weight"] * ln_scale,
            fill=0.0 if source is not None else 1.0)
        put(f"{key}.bias", (width,), None if source is None else src[f"{source}.bias"])

    v = "vision_model"
    patch = config["patch_size"]
    put(f"{v}.embeddings.patch_embedding.weight", (width, 3, patch, patch),
        src[f"{v}.embeddings.patch_embedding.weight"])
    put(f"{v}.embeddings.class_embedding", (width,), src[f"{v}.embeddings.class_embedding"])
    positions = (config["image_size"] // patch) ** 2 + 1
    put(f"{v}.embeddings.position_embedding.weight", (positions, width),
        src[f"{v}.embeddings.position_embedding.weight"])
    norm(f"{v}.pre_layrnorm", f"{v}.pre_layrnorm")
    norm(f"{v}.post_layernorm", f"{v}.post_layernorm")
    for i in range(config["num_hidden_layers"]):
        key, source = f"{v}.encoder.layers.{i}", f"{v}.encoder.layers.{i}"
        trained = i < len(layers)
        for n in ("layer_norm1", "layer_norm2"):
            norm(f"{key}.{n}", f"{source}.{n}" if trained else None)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            for part, shape in (("weight", (width, width)), ("bias", (width,))):
                name = f"self_attn.{proj}.{part}"
                put(f"{key}.{name}", shape, src[f"{source}.{name}"] if trained else None)
        for fc, shape in (("fc1", (hidden, width)), ("fc2", (width, hidden))):
            put(f"{key}.mlp.{fc}.weight", shape, src[f"{source}.mlp.{fc}.weight"] if trained else None)
            put(f"{key}.mlp.{fc}.bias", shape[:1], src[f"{source}.mlp.{fc}.bias"] if trained else None)
    if "projection_dim" in config:
        put("visual_projection.weight", (config["projection_dim"], width))  # image_embeds: unused by the encoder
    return out


def install(folder: Path, tower: Tower = CURRENT) -> Path:
    """Write the tower's stock-loadable file into `folder` (a models/clip_vision folder) unless it is there; its
    path."""
    from safetensors.torch import save_file

    target = folder / tower.stock_name
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.half().contiguous() for k, v in stock_state_dict(load_small(tower)).items()}
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".partial", delete=False) as f:
            partial = Path(f.name)
        save_file(state, str(partial))
        partial.replace(target)  # atomic: a killed install leaves no half file under the real name
    return target


# -- the linear probe ----------------------------------------------------------------------------------------------
@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([tokens(model, images[i:i + batch]).mean(dim=1) for i in range(0, len(images), batch)])


def linear_probe(model: torch.nn.Module, n_train: int = 3000, n_test: int = 1500, seed: int = 77
                 ) -> dict[str, float]:
    """Fresh logistic-regression probes per attribute on the mean token: fitted on scenes without the benchmark
    pairs, scored on scenes of every pair and on the benchmark pairs alone."""
    train_x, train_y = renders(n_train, seed, include_benchmark_pairs=False)
    test_x, test_y = renders(n_test, seed + 1, include_benchmark_pairs=True)
    bench_x, bench_y = benchmark_renders(n_test // 3, seed + 2)
    features = {name: pooled_features(model, x) for name, x in (("train", train_x), ("test", test_x),
                                                                 ("bench", bench_x))}
    mean, std = features["train"].mean(0), features["train"].std(0) + 1e-6
    result = {}
    for i, attribute in enumerate(world.ATTRIBUTES):
        probe = fit_probe((features["train"] - mean) / std, train_y[:, i], len(world.CLASSES[attribute]))
        for split, y in (("test", test_y), ("bench", bench_y)):
            predicted = probe((features[split] - mean) / std).argmax(-1)
            result[f"{attribute}_{split}"] = float((predicted == y[:, i]).float().mean())
    return result


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> torch.nn.Module:
    """Multinomial logistic regression (L-BFGS, a small L2 penalty)."""
    probe = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-4 * probe.weight.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        optimizer.step(closure)
    return probe


def benchmark_renders(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scenes of the benchmark concepts' colour × shape pairs only, at every size and position."""
    pick, rng = random.Random(seed), np.random.default_rng(seed)
    pairs = sorted(BENCHMARK_PAIRS)
    images, labels = [], []
    for _ in range(n):
        colour, shape = pick.choice(pairs)
        attrs = (colour, shape, pick.choice(world.SIZES), pick.choice(world.POSITIONS))
        images.append(world.render(attrs, rng)[0])
        labels.append(world.labels_of(attrs))
    return torch.from_numpy(np.stack(images)).float() / 255, torch.tensor(labels)


@dataclass(frozen=True)
class Run:
    """One training run of a tower's chain: the weights it continues (None: a new tower), its repainted share, and
    the seed of its first scene."""

    tower: Tower
    start: Path | None
    random_colour: float
    scenes: int


def runs_of(tower: Tower) -> list[Run]:
    """Every run that makes `tower`, its start's first. A continued run draws scenes where the chain's last continued
    run of the same repainted share stopped, so no scene is drawn twice (a first run draws from 0)."""
    lineage = [tower]
    while lineage[0].start is not None:
        lineage.insert(0, lineage[0].start)
    drawn: dict[float, int] = {}  # continued runs' scenes so far, per repainted share
    runs: list[Run] = []
    start: Path | None = None  # the weights the next run continues
    for owner in lineage:
        for share in owner.runs:
            scenes = 0
            if start is not None:
                scenes = 1_000_000 * (1 + int(100 * share)) + drawn.get(share, 0)
                drawn[share] = drawn.get(share, 0) + owner.steps
            runs.append(Run(owner, start, share, scenes))
            start = owner.file
    return runs


def build(tower: Tower, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the tower in its runs (each continuing the last with a new cosine schedule), save it, probe it; the
    stats for world.json."""
    runs = []
    for run in runs_of(tower):
        if run.tower is tower:
            model, stats = train(tower, tower.steps, start=run.start, random_colour=run.random_colour,
                                 scenes=run.scenes, log=log)
            save_weights(model, tower.file)
            runs.append(stats)
    stats = {"runs": runs}
    stats["probe"] = linear_probe(model)
    log(json.dumps(stats))
    return stats
