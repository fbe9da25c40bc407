"""Training prompts: the diffusers template lists (docs/METHODS.md §2b) or one caption per image.

`{}` marks the concept's slot in every prompt.
"""

from __future__ import annotations

import re
from typing import Literal

PromptMode = Literal["object", "style", "captions"]
SLOT = "{}"

# huggingface/diffusers examples/textual_inversion/textual_inversion.py (imagenet_templates_small), the list
# DTI and BaTex also train with.
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)

# The same file's imagenet_style_templates_small.
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a cropped painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


def caption_prompts(captions: str, name: str, num_images: int) -> list[str]:
    """One training prompt per image from `captions`, one line each (a single line serves every image).

    Each line names the concept as `{}` or by its name (`a photo of my_dog on grass`).

    Raises:
        ValueError: when the number of lines matches neither 1 nor the number of images, or a line does not
            mention the concept.
    """
    lines = [line.strip() for line in captions.strip().splitlines() if line.strip()]
    if len(lines) not in (1, num_images):
        images = f"{num_images} image{'s' * (num_images != 1)}"
        raise ValueError(f"captions: got {len(lines)} lines for {images}; write one line per image "
                         "(in batch order) or a single line for all.")
    word = re.compile(rf"(?<![\w.\-]){re.escape(name)}(?![\w\-])")
    prompts = []
    for i, line in enumerate(lines, start=1):
        prompt = word.sub(SLOT, line)
        if SLOT not in prompt:
            raise ValueError(f"captions: line {i} ({line!r}) mentions neither {{}} nor '{name}', so the concept "
                             "would learn nothing from it.")
        prompts.append(prompt)
    return prompts * num_images if len(prompts) == 1 else prompts


def training_prompts(mode: PromptMode, name: str, num_images: int, captions: str = "") -> tuple[list[str], bool]:
    """The prompts to train with and whether they are per image (captions) rather than sampled (templates)."""
    if mode == "object":
        return list(OBJECT_TEMPLATES), False
    if mode == "style":
        return list(STYLE_TEMPLATES), False
    if mode == "captions":
        if not captions.strip():
            raise ValueError("captions: prompt mode is 'captions' but no captions were given.")
        return caption_prompts(captions, name, num_images), True
    raise ValueError(f"Unknown prompt mode {mode!r}; expected object, style or captions.")
