"""The toy world: one coloured shape on a grey background, its captions, and the benchmark's splits.

Pure numpy/PIL, no ComfyUI. Everything is a function of explicit seeds, so every dataset, prompt list and
reference set is reproducible. The design (after the prototype in shared/toyworld/REPORT.md):
- hidden words: teal objects and hearts appear in training images, but the words "teal" and "heart" never
  appear in a caption (teal objects get no colour word, hearts are called "shape");
- held-out combinations: some colour×shape and shape×position pairs are in no training image at all;
- concepts for the per-method benchmark: eight, of four kinds (a hidden colour, a hidden shape, known-word
  controls, and references that vary); six have a colour×shape pair that is in no training image. Most have four
  references that are all big and centred, so prompts asking for "small" or another position test editability;
  two have references that vary in size and position, to show what varied references keep editable.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

RES = 64                                     # pixels; the VAE's fixed downscale of 8 gives 8×8 latents
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLOURS: dict[str, tuple[int, int, int]] = {  # name -> RGB; far apart so a 64 px VAE round-trip keeps them apart
    "red": (215, 30, 30), "orange": (245, 135, 20), "yellow": (240, 220, 35), "green": (40, 165, 45),
    "blue": (35, 65, 225), "purple": (135, 40, 180), "pink": (250, 135, 195), "white": (245, 245, 245),
    "teal": (0, 128, 128),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")
ATTRIBUTES = ("colour", "shape", "size", "position")   # label order everywhere (judge heads, label arrays)
CLASSES = {"colour": COLOUR_NAMES, "shape": SHAPES, "size": SIZES, "position": POSITIONS}

SIZE_R = {"small": 10.0, "big": 17.0}        # radius in px; 2.5 / 4 latent cells across, so shape survives the VAE
OFFSET = 13.0                                # px from the centre for left/right/top/bottom
POS_XY = {"left": (32 - OFFSET, 32), "right": (32 + OFFSET, 32), "top": (32, 32 - OFFSET),
          "bottom": (32, 32 + OFFSET), "center": (32, 32)}
POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
              "center": "in the center"}

HIDDEN_COLOURS = frozenset({"teal"})
HIDDEN_SHAPES = frozenset({"heart"})
HELDOUT_COLOUR_SHAPE = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "square"),
                                  ("yellow", "cross"), ("white", "star")})
HELDOUT_SHAPE_POSITION = frozenset({("square", "left"), ("circle", "top"), ("triangle", "right")})

ATTRIBUTE_DROP = 0.2    # each of size, colour and position is left out of a caption with this probability
GENERIC_NOUN = 0.2      # share of visible shapes called "shape", so that "shape" does not simply mean "heart"
PHOTO_PREFIX = 0.5      # share of captions that start with "a photo of"
EMPTY_CAPTION = ""      # the unconditional caption (classifier-free guidance)


@dataclass(frozen=True)
class Concept:
    """A concept for the per-method benchmark."""
    name: str
    colour: str
    shape: str
    kind: str            # "hidden colour", "hidden shape", "known words" or "varied references"
    varied: bool = False  # references of both sizes at four positions instead of big and centred

    @property
    def hidden_words(self) -> tuple[str, ...]:
        return tuple(w for w in (self.colour, self.shape) if w in HIDDEN_COLOURS | HIDDEN_SHAPES)

    @property
    def pair_seen(self) -> bool:
        """Whether the base model saw this colour×shape pair (under its caption's words) in training."""
        return (self.colour, self.shape) not in HELDOUT_COLOUR_SHAPE | BUILD_HELDOUT_PAIRS


# The pairs held out of the base model's training images (beside HELDOUT_COLOUR_SHAPE) when the shipped weights
# were built: the first four benchmark concepts'. Frozen, so that adding concepts never changes what a rebuild
# trains on.
BUILD_HELDOUT_PAIRS = frozenset({("teal", "star"), ("pink", "heart"), ("orange", "square"), ("purple", "triangle")})

CONCEPTS = {c.name: c for c in (
    Concept("tealstar", "teal", "star", "hidden colour"),
    Concept("pinkheart", "pink", "heart", "hidden shape"),
    Concept("orangesquare", "orange", "square", "known words"),
    Concept("purpletriangle", "purple", "triangle", "known words"),
    Concept("tealcross", "teal", "cross", "hidden colour"),                    # pair seen, as "a cross"
    Concept("yellowheart", "yellow", "heart", "hidden shape"),                 # pair seen, as "a yellow shape"
    Concept("whitestar", "white", "star", "varied references", varied=True),   # held-out pair
    Concept("redtriangle", "red", "triangle", "varied references", varied=True),  # held-out pair
)}
REFERENCE_SEED = 1234
REFERENCES = 4  # images per concept that methods learn from
CENTRED_LAYOUT = ("big", "center")  # (size, position) of a reference that is not varied
VARIED_REFERENCES = (("big", "center"), ("small", "left"), ("big", "top"), ("small", "right"))

Attrs = tuple[str, str, str, str]   # (colour, shape, size, position)


def in_training(colour: str, shape: str, size: str, position: str) -> bool:
    """Whether a combination may appear in the base model's training images."""
    pair = (colour, shape)
    return (pair not in HELDOUT_COLOUR_SHAPE and pair not in BUILD_HELDOUT_PAIRS
            and (shape, position) not in HELDOUT_SHAPE_POSITION)


def uses_known_words(colour: str, shape: str) -> bool:
    return colour not in HIDDEN_COLOURS and shape not in HIDDEN_SHAPES


# -- drawing ------------------------------------------------------------------------------------------------------
def shape_outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of `shape` centred at (cx, cy) with nominal radius r; areas are roughly matched."""
    if shape == "circle":
        return [(cx + r * math.cos(2 * math.pi * k / 64), cy + r * math.sin(2 * math.pi * k / 64)) for k in range(64)]
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        rr = r * 1.15                                   # an inscribed triangle is small; enlarge it
        return [(cx + rr * math.cos(math.radians(a)), cy + 0.15 * r - rr * math.sin(math.radians(a)))
                for a in (90, 210, 330)]
    if shape == "star":
        return [(cx + (r * 1.1 if k % 2 == 0 else r * 0.48) * math.cos(math.radians(90 + 36 * k)),
                 cy - (r * 1.1 if k % 2 == 0 else r * 0.48) * math.sin(math.radians(90 + 36 * k))) for k in range(10)]
    if shape == "cross":
        a, b = r, r * 0.36
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    if shape == "heart":
        points = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append((cx + x * r / 16.0, cy - (y + 2.5) * r / 16.0))
        return points
    raise ValueError(f"shape: {shape!r} is not one of {SHAPES}")


def render(attrs: Attrs, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image [RES, RES, 3] uint8 and its object mask [RES, RES] float32 in 0..1.

    Grey background with a gentle gradient and tint; colour, size and position are jittered so that an
    attribute is a class, not a single picture. Drawn at 4× and box-filtered for anti-aliased edges.
    """
    colour, shape, size, position = attrs
    grey = rng.uniform(95, 165)
    gx, gy = rng.uniform(-12, 12, 2)
    yy, xx = np.mgrid[0:RES, 0:RES] / (RES - 1) - 0.5
    background = np.stack([grey + gx * xx + gy * yy + rng.uniform(-6, 6) for _ in range(3)], -1)
    cx, cy = (v + rng.uniform(-2.0, 2.0) for v in POS_XY[position])
    r = SIZE_R[size] * rng.uniform(0.92, 1.08)
    ss = 4
    canvas = Image.new("L", (RES * ss, RES * ss), 0)
    ImageDraw.Draw(canvas).polygon([(x * ss, y * ss) for x, y in shape_outline(shape, cx, cy, r)], fill=255)
    mask = np.asarray(canvas.resize((RES, RES), Image.BOX), dtype=np.float32) / 255.0
    rgb = np.array(COLOURS[colour], dtype=np.float64) + rng.uniform(-10, 10, 3)
    image = background * (1 - mask[..., None]) + rgb * mask[..., None]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


# -- captions and prompts -----------------------------------------------------------------------------------------
def caption(attrs: Attrs, rng: random.Random) -> str:
    """A training caption with attribute dropout; hidden words are never emitted."""
    colour, shape, size, position = attrs
    words = ["a"]
    if rng.random() >= ATTRIBUTE_DROP:
        words.append(size)
    if colour not in HIDDEN_COLOURS and rng.random() >= ATTRIBUTE_DROP:
        words.append(colour)
    words.append("shape" if shape in HIDDEN_SHAPES or rng.random() < GENERIC_NOUN else shape)
    if rng.random() >= ATTRIBUTE_DROP:
        words.append(POS_PHRASE[position])
    text = " ".join(words)
    return "a photo of " + text if rng.random() < PHOTO_PREFIX else text


def prompt(colour: str | None = None, shape: str | None = None, size: str | None = None,
           position: str | None = None) -> str:
    """The evaluation prompt naming the given attributes, e.g. "a photo of a big red circle on the left"."""
    words = ["a"] + [w for w in (size, colour) if w] + [shape or "shape"]
    if position:
        words.append(POS_PHRASE[position])
    return "a photo of " + " ".join(words)


# -- datasets -----------------------------------------------------------------------------------------------------
def random_attrs(rng: random.Random, training_only: bool) -> Attrs:
    while True:
        attrs = (rng.choice(COLOUR_NAMES), rng.choice(SHAPES), rng.choice(SIZES), rng.choice(POSITIONS))
        if not training_only or in_training(*attrs):
            return attrs


def labels_of(attrs: Attrs) -> list[int]:
    return [CLASSES[a].index(v) for a, v in zip(ATTRIBUTES, attrs, strict=True)]


def make_images(n: int, seed: int, training_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[Attrs]]:
    """n images [n, RES, RES, 3] uint8, masks [n, RES, RES] float16, labels [n, 4] int64 and the attribute tuples.

    `training_only` restricts to combinations the base model may see; the VAE and the judge see all of them.
    """
    pick, rng = random.Random(seed), np.random.default_rng(seed)
    images = np.zeros((n, RES, RES, 3), np.uint8)
    masks = np.zeros((n, RES, RES), np.float16)
    attrs = [random_attrs(pick, training_only) for _ in range(n)]
    for i, a in enumerate(attrs):
        images[i], masks[i] = render(a, rng)
    return images, masks, np.array([labels_of(a) for a in attrs], np.int64), attrs


def reference_layouts(name: str, n: int = REFERENCES) -> list[tuple[str, str]]:
    """(size, position) of the concept's references: all big and in the centre, or (a varied concept) cycling
    through VARIED_REFERENCES."""
    varied = CONCEPTS[name].varied
    return [VARIED_REFERENCES[i % len(VARIED_REFERENCES)] if varied else CENTRED_LAYOUT for i in range(n)]


def concept_references(name: str, n: int = REFERENCES, seed: int = REFERENCE_SEED) -> np.ndarray:
    """The concept's reference images [n, RES, RES, 3] uint8, laid out as `reference_layouts` says."""
    c, rng = CONCEPTS[name], np.random.default_rng(seed)
    return np.stack([render((c.colour, c.shape, size, position), rng)[0]
                     for size, position in reference_layouts(name, n)])


def layout_caption(size: str, position: str) -> str:
    """What an image shows besides its object, with {} for the object: "a photo of a big {} in the center"."""
    return prompt(shape="{}", size=size, position=position)


# -- evaluation suites --------------------------------------------------------------------------------------------
def heldin_suite(n: int = 48, seed: int = 2024) -> list[Attrs]:
    """Distinct training combinations with known words only: the base model's main test."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        a = random_attrs(rng, training_only=True)
        if uses_known_words(a[0], a[1]) and a not in seen:
            seen.add(a)
            out.append(a)
    return out


def heldout_colour_shape_suite(per_pair: int = 3, seed: int = 2025) -> list[Attrs]:
    """Each held-out colour×shape pair (and known-word concept pair) at random sizes and seen positions."""
    rng, out = random.Random(seed), []
    pairs = sorted(HELDOUT_COLOUR_SHAPE | {p for p in BUILD_HELDOUT_PAIRS if uses_known_words(*p)})
    for colour, shape in pairs:
        for _ in range(per_pair):
            position = rng.choice([p for p in POSITIONS if (shape, p) not in HELDOUT_SHAPE_POSITION])
            out.append((colour, shape, rng.choice(SIZES), position))
    return out


def heldout_shape_position_suite(per_pair: int = 3, seed: int = 2026) -> list[Attrs]:
    """Each held-out shape×position pair with random known colours whose colour×shape pair was seen."""
    rng, out = random.Random(seed), []
    for shape, position in sorted(HELDOUT_SHAPE_POSITION):
        for _ in range(per_pair):
            colour = rng.choice([c for c in COLOUR_NAMES if uses_known_words(c, shape)
                                 and (c, shape) not in HELDOUT_COLOUR_SHAPE | BUILD_HELDOUT_PAIRS])
            out.append((colour, shape, rng.choice(SIZES), position))
    return out


def definition() -> dict[str, object]:
    """The world as JSON-able data, for weights/world.json."""
    return {
        "resolution": RES, "shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
        "sizes": {s: SIZE_R[s] for s in SIZES}, "positions": {p: list(POS_XY[p]) for p in POSITIONS},
        "position_phrases": POS_PHRASE, "hidden_colours": sorted(HIDDEN_COLOURS),
        "hidden_shapes": sorted(HIDDEN_SHAPES),
        "heldout_colour_shape": sorted(map(list, HELDOUT_COLOUR_SHAPE)),
        "heldout_shape_position": sorted(map(list, HELDOUT_SHAPE_POSITION)),
        "caption": {"attribute_drop": ATTRIBUTE_DROP, "generic_noun": GENERIC_NOUN, "photo_prefix": PHOTO_PREFIX,
                    "example": prompt("red", "circle", "big", "left")},
        "concepts": {c.name: {"colour": c.colour, "shape": c.shape, "kind": c.kind,
                              "hidden_words": list(c.hidden_words),
                              "pair_seen": c.pair_seen,
                              "references": "4 images, %s, seed %d" % (
                                  ", ".join(" ".join(v) for v in VARIED_REFERENCES) if c.varied else "big, center",
                                  REFERENCE_SEED)}
                     for c in CONCEPTS.values()},
    }
