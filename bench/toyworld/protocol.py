"""The benchmark's protocol: each row's recipe and where it comes from, the prompts that are scored, and the check
that no scored prompt is one the row trained on (docs/METHODS.md has the recipes' sources).

Pure Python: the unit tests check the protocol without ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from concept_forge.trainers.methods.tuning_encoder import samples_per_step

from . import world

CURVE = (25, 50, 100, 200, 400, 1000)   # identity is scored after this many steps of every curve row
PER_GROUP = 32                          # images per prompt group
EDIT_COLOUR = "blue"                    # the colour-change prompt; no concept is blue
POSITIONS = ("left", "right", "top", "bottom")
SIZE_WORDS = frozenset({"small", "large", "big", "tiny", "huge"})
BATEX_M_PER_WIDTH = 720 / 768           # regression.sh's M = 720 on SD 1.5's 768-wide encoder
CLASS_WORD = {"tealstar": "star", "pinkheart": "shape", "orangesquare": "square", "purpletriangle": "triangle",
              "tealcross": "cross", "yellowheart": "shape", "whitestar": "star", "redtriangle": "triangle"}
GROUP_SEEDS = {"identity": 7000, "position": 7100, "size": 7200, "colour": 7300}


@dataclass(frozen=True)
class Row:
    """One method at one recipe. Learning rates are per sample: the node multiplies by the batch, as each method's
    official code does (`scale_lr`); the Tuning Encoder's are per step, and its batch is samples per step."""

    name: str
    method: str
    steps: int                  # the recipe's length: fidelity is scored here
    learning_rate: float
    recipe: str                 # where the settings come from
    batch_size: int = 4
    options: Mapping[str, Any] = field(default_factory=dict)  # fields of the method's Options
    size_words: bool = True     # train on the template list as published (it says "small" and "large")
    curve: bool = True          # identity after every CURVE step (one run, resumed through the node)
    generation_blend: float = 1.0  # α of Tuning Encoder Dual Path while scoring (1: the node's own outputs)
    captioned: bool = False     # tuned on its reference's caption (`reference_captions`) instead of the templates

    @property
    def effective_learning_rate(self) -> float:
        return self.learning_rate * self.batch_size

    @property
    def score_groups(self) -> tuple[str, ...]:
        # the size-word ablation only changes what "small" does
        return ("identity", "position", "size", "colour") if self.size_words else ("identity", "size")


def _no_size(row: Row) -> Row:
    return Row(f"{row.name}, no size words", row.method, row.steps, row.learning_rate,
               f"{row.name}'s recipe; the training templates that say a size left out", row.batch_size, row.options,
               size_words=False, curve=False)


TI = Row("TI", "ti", 400, 5e-3, "DTI's TI baseline (exps/ti_sdxl.py): AdamW 5e-3 × batch 4 = 0.02, 400 steps")
TI_SLOW = Row("TI 2e-3", "ti", 1000, 5e-4, "BaTex's claim baseline, diffusers' README rate: 5e-4 × 4 = 2e-3; "
              "scored at BaTex's 1000 steps")
DTI = Row("DTI", "dti", 400, 0.01, "exps/ours_sdxl.py: SphericalSGD 0.01 × 4 = 0.04, β = 0, 400 steps",
          options={"beta": 0.0})
DTI_BETA = Row("DTI β 0.99", "dti", 400, 0.01, "DTI's recipe with the step-size average of the repo's "
               "training/manifold.py (β = 0.99)", options={"beta": 0.99})
BATEX = Row("BaTex", "batex", 1000, 5e-4, "regression.sh: M/d = 720/768, AdamW 5e-4 × 4 = 2e-3, 1000 steps")
CATVERSION = Row("CatVersion", "catversion", 1000, 5e-3, "v1-finetune.yaml: 5e-3 × batch 2 = 1e-2, 1000 steps; "
                 "mask bias 0 (the paper's attention)", batch_size=2, options={"mask_bias": 0.0})
CATVERSION_BIAS = Row("CatVersion +1 bias", "catversion", 1000, 5e-3, "CatVersion's recipe with the official "
                      "code's +1 logit bias on the residual keys", batch_size=2, options={"mask_bias": 1.0})
TUNING_ENCODER = Row("Tuning Encoder, no weights", "tuning_encoder", 12, 0.0, "its node's defaults: 12 steps "
                     "from one reference, no encoder weights", batch_size=samples_per_step(0, 1, False), curve=False)
# The pretrained toy-world encoders (bench/toyworld/weights/encoder*.safetensors, README "Tuning Encoder"): the
# full one, and one pretrained with each mechanism switched off, tuned with that mechanism off too; these four were
# pretrained without gradient clipping (--max-grad-norm 0), the "clipped" ones with the default 1.0
ENCODERS = {"full": "encoder.safetensors", "no contrastive": "encoder_no_contrastive.safetensors",
            "no dual path": "encoder_no_dual_path.safetensors", "scales": "encoder_scales.safetensors",
            "clipped": "encoder_clipped.safetensors",
            "no dual path, clipped": "encoder_no_dual_path_clipped.safetensors",
            "no codes, clipped": "encoder_no_codes_clipped.safetensors",
            "rank 2, clipped": "encoder_rank2_clipped.safetensors",
            "rank 8, clipped": "encoder_rank8_clipped.safetensors",
            "second tower, clipped": "encoder_vision2_clipped.safetensors",
            "clipped, seed 1": "encoder_clipped_seed1.safetensors",
            "second tower, clipped, seed 1": "encoder_vision2_clipped_seed1.safetensors"}


def _encoder_row(name: str, steps: int, encoder: str, recipe: str, generation_blend: float = 1.0,
                 captioned: bool = False, **options: Any) -> Row:
    """A row through the Tuning Encoder node from one reference; `options` are its inputs (batch_size 0: the node's
    samples a step)."""
    return Row(name, "tuning_encoder", steps, 0.0, recipe, batch_size=samples_per_step(options.get("batch_size", 0),
                                                                                          1, captioned),
               options={"encoder": ENCODERS[encoder], **options}, curve=False, generation_blend=generation_blend,
               captioned=captioned)


ENCODER_ROWS = (
    _encoder_row("Tuning Encoder, prediction", 0, "full", "the pretrained encoder's prediction from one reference, "
                 "no tuning step"),
    _encoder_row("Tuning Encoder, 4 steps", 4, "full", "the prediction and 4 tuning steps (node defaults)"),
    _encoder_row("Tuning Encoder", 12, "full", "the prediction and 12 tuning steps (node defaults)"),
    _encoder_row("Tuning Encoder, no contrastive term", 12, "no contrastive", "12 steps; encoder pretrained and "
                 "tuned without the nearest-token contrastive term", contrastive=0.0),
    _encoder_row("Tuning Encoder, no dual path", 12, "no dual path", "12 steps; encoder pretrained and tuned "
                 "without the dual path (α = 1)", blend=1.0),
    _encoder_row("Tuning Encoder, scales hypernetwork", 12, "scales", "12 steps; encoder whose hypernetwork "
                 "predicts r scales per layer over shared factors instead of the offsets"),
    _encoder_row("Tuning Encoder, clipped pretraining", 12, "clipped", "12 steps (node defaults); encoder "
                 "pretrained with the gradients' norm clipped to 1"),
    _encoder_row("Tuning Encoder, no dual path, clipped pretraining", 12, "no dual path, clipped", "12 steps; "
                 "encoder pretrained with clipped gradients and, as it is tuned, without the dual path (α = 1)",
                 blend=1.0),
    _encoder_row("Tuning Encoder, no concept codes, clipped pretraining", 12, "no codes, clipped", "12 steps (node "
                 "defaults); encoder pretrained with clipped gradients and without concept codes (DATE's losses "
                 "alone, --codes 0)"),
    *(_encoder_row(f"Tuning Encoder, rank {r}, clipped pretraining", 12, f"rank {r}, clipped", "12 steps (node "
                   f"defaults); encoder pretrained with clipped gradients at LoRA rank {r} (4 elsewhere)")
      for r in (2, 8)),
    _encoder_row("Tuning Encoder, clipped pretraining, seed 1", 12, "clipped, seed 1", "12 steps (node defaults); "
                 "the clipped encoder pretrained again from seed 1: how far two pretraining runs differ"),
    _encoder_row("Tuning Encoder, second vision tower, clipped pretraining", 12, "second tower, clipped", "12 steps "
                 "(node defaults); encoder pretrained with clipped gradients on the second toy vision tower, which "
                 "reads shape (its own CLIP vision file)"),
    _encoder_row("Tuning Encoder, second vision tower, clipped pretraining, seed 1", 12,
                 "second tower, clipped, seed 1", "12 steps (node defaults); the second tower's encoder pretrained "
                 "again from seed 1"),
    _encoder_row("Tuning Encoder, dual path at generation", 12, "full", "the prediction and 12 tuning steps (node "
                 "defaults), every image generated through Tuning Encoder Dual Path at its default α 0.8",
                 generation_blend=0.8),
    _encoder_row("Tuning Encoder, captioned", 12, "full", "the prediction and 12 tuning steps on the reference's "
                 "caption ('a photo of a big {} in the center') at the node's defaults for a caption (8 samples a "
                 "step), the recipe chosen on the held-out pairs (README)", captioned=True),
    _encoder_row("Tuning Encoder, captioned, 4 steps", 4, "full", "the captioned recipe stopped after 4 steps",
                 captioned=True),
    _encoder_row("Tuning Encoder, captioned, clipped pretraining, seed 1", 12, "clipped, seed 1", "the captioned "
                 "recipe from the encoder of another pretraining seed (its default tuning: the least likeness of "
                 "the two seeds)", captioned=True),
    _encoder_row("Tuning Encoder, batch 8", 12, "full", "12 tuning steps of 8 samples each on the node's templates: "
                 "the captioned recipe without its caption", batch_size=8),
)
# TI's recipe on the captions the captioned Tuning Encoder gets, one per reference: whether a caption alone does it
TI_CAPTIONED = Row("TI, captioned", "ti", 400, 5e-3, "TI's recipe on the references' captions ('a photo of a big "
                   "{} in the center') instead of the templates", curve=False, captioned=True)

ROWS: dict[str, Row] = {r.name: r for r in (TI, TI_SLOW, DTI, DTI_BETA, BATEX, CATVERSION, CATVERSION_BIAS,
                                            _no_size(TI), _no_size(DTI), _no_size(BATEX), TI_CAPTIONED,
                                            TUNING_ENCODER, *ENCODER_ROWS)}
BASELINE_ROWS = ("class word", "own words")


def batex_basis_size(width: int) -> int:
    """M for an encoder `width` wide, in the paper's proportion."""
    return round(BATEX_M_PER_WIDTH * width)


def curve_points(row: Row) -> list[int]:
    """The step counts at which a row is scored: its curve (through the recipe's steps) or the recipe alone."""
    return sorted({*CURVE, row.steps}) if row.curve else [row.steps]


def phrase(row_or_baseline: str, concept: world.Concept) -> str:
    """What a prompt calls the concept."""
    if row_or_baseline == "class word" or ROWS.get(row_or_baseline, TI).method == "catversion":
        return CLASS_WORD[concept.name]
    if row_or_baseline == "own words":
        return f"{concept.colour} {'shape' if concept.shape in world.HIDDEN_SHAPES else concept.shape}"
    return f"embedding:{concept.name}"


def scored_prompts(text: str) -> dict[str, list[str]]:
    """Every prompt a group is scored on. No method's training prompt has this form: the templates all start
    with a word before the article ("a photo of a {}"), and CatVersion trains on the bare class word."""
    return {"identity": [f"a {text}"],
            "position": [f"a {text} {world.POS_PHRASE[p]}" for p in POSITIONS],
            "size": [f"a small {text}"],
            "colour": [f"a {EDIT_COLOUR} {text}"]}


def training_templates(row: Row) -> list[str]:
    """The template list a row trains with (`{}`: the concept)."""
    from concept_forge.trainers.templates import OBJECT_TEMPLATES

    if row.size_words:
        return list(OBJECT_TEMPLATES)
    return [t for t in OBJECT_TEMPLATES if not SIZE_WORDS & set(t.replace("{}", " ").split())]


def reference_captions(concept: world.Concept, n: int = world.REFERENCES) -> list[str]:
    """What a captioned row trains on: a caption per reference, as the encoder's pretraining folder captions its
    images ("a photo of a big {} in the center")."""
    return [world.layout_caption(*layout) for layout in world.reference_layouts(concept.name, n)]


def contamination(row: Row, concept: world.Concept) -> set[str]:
    """Scored prompts that are also training prompts of `row` (must be empty)."""
    from concept_forge.trainers.methods import method_prompts

    text = phrase(row.name, concept)
    prompts = reference_captions(concept) if row.captioned else training_templates(row)
    trained = {p.replace("{}", text) for p in method_prompts(row.method, prompts, row.captioned,
                                                             CLASS_WORD[concept.name])}
    scored = {p for group in scored_prompts(text).values() for p in group}
    return trained & scored
