import pytest
from concept_forge.trainers.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, caption_prompts, training_prompts


def test_template_lists_are_the_diffusers_ones():
    # 27 object and 19 style templates (docs/METHODS.md §2b); each has exactly one slot
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    assert all(t.count("{}") == 1 for t in OBJECT_TEMPLATES + STYLE_TEMPLATES)
    assert OBJECT_TEMPLATES[0] == "a photo of a {}" and STYLE_TEMPLATES[-1] == "a large painting in the style of {}"


def test_captions_accept_the_slot_or_the_concept_name():
    prompts = caption_prompts("a photo of my_dog on grass\n{} asleep on a sofa\n", "my_dog", 2)
    assert prompts == ["a photo of {} on grass", "{} asleep on a sofa"]


def test_one_caption_serves_every_image():
    assert caption_prompts("my_dog, studio light", "my_dog", 3) == ["{}, studio light"] * 3


def test_caption_without_the_concept_is_refused_with_its_line_number():
    with pytest.raises(ValueError, match="line 2 .*mentions neither"):
        caption_prompts("my_dog\na photo of my_dogs", "my_dog", 2)


def test_caption_count_must_match_images():
    with pytest.raises(ValueError, match="got 2 lines for 3 images"):
        caption_prompts("{} a\n{} b", "x", 3)


def test_captions_mode_needs_captions():
    with pytest.raises(ValueError, match="no captions were given"):
        training_prompts("captions", "x", 2, "  ")
    assert training_prompts("style", "x", 2) == (list(STYLE_TEMPLATES), False)
