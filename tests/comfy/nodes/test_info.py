"""Concept Info: the text a user reads about a concept."""

import torch
from comfy_tier import require_comfyui, run_node, ui_text

tc = require_comfyui()

from concept_forge.nodes.info import ConceptInfo  # noqa: E402
from concept_forge.trainers.concept import Concept  # noqa: E402


def test_a_ti_concept_is_described_against_the_clips_vocabulary():
    clip = tc.tiny_clip("sd1")
    table = clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight
    dog = clip.tokenize("dog")["l"][0][1][0]
    concept = Concept("my_dog", "ti", "sd1", {"l": table[[dog]].float() * 3},
                      provenance={"init_word": "dog", "steps": 400, "seed": 7, "checkpoint": "v1-5.safetensors",
                                  "checkpoint_sha256": "ab" * 32})
    out = run_node(ConceptInfo, concept=concept, clip=clip)
    text = out.args[0]
    assert text == ui_text(out)
    assert text.startswith("my_dog: TI concept for SD 1.x, 1 vector(s) per encoder (clip_l).")
    assert "nearest: dog (1.00)" in text  # the vector is the token 'dog', lengthened
    assert "longer than 100% of the vocabulary" in text
    assert "init word: dog; steps: 400; seed: 7; checkpoint: v1-5.safetensors; checkpoint sha256: abababababab…" in text


def test_method_state_is_listed_and_a_foreign_clip_is_noted():
    dti = Concept("d", "dti", "sdxl", {"l": torch.ones(1, 32), "g": torch.ones(1, 48)},
                  state={"magnitude": {"l": 0.4, "g": 0.6}, "magnitude_mode": "mean", "kappa": 1e-4})
    text = run_node(ConceptInfo, concept=dti, clip=tc.tiny_clip("sd1")).args[0]
    assert "DTI: length m* = 0.400 (clip_l), 0.600 (clip_g), magnitude mean, κ = 0.0001" in text
    assert "This CLIP is SD 1.x, so the vocabulary comparison is skipped" in text
    cv = Concept("c", "catversion", "sd1", {}, state={"layers": {"l": [9, 10, 11]}, "tokens": 1, "mask_bias": 0.0,
                                                      "class_word": "dog"})
    text = run_node(ConceptInfo, concept=cv).args[0]
    assert "CatVersion: clip_l layers 9–11, 1 token(s) per layer, mask bias 0.0, class word 'dog'" in text
    assert "No provenance recorded." in text


def test_batex_lists_the_basis_words_with_the_largest_weights():
    clip = tc.tiny_clip("sd1")
    ids = [t for t, _ in clip.tokenize("dog cat bird")["l"][0][1:4]]
    state = {"ranking": "dot", "rank": {"l": [3]}, "bases": {"l": [{"ids": ids, "w": [0.2, 0.7, -0.1]}]}}
    concept = Concept("b", "batex", "sd1", {"l": torch.ones(1, 32)}, state=state)
    text = run_node(ConceptInfo, concept=concept, clip=clip).args[0]
    assert "BaTex: basis ranked by dot, rank(B) 3 (clip_l)" in text
    assert "largest weights: cat (+0.700), dog (+0.200), bird (-0.100)" in text


def test_vectors_of_another_width_and_an_incomplete_state_are_described_not_crashed_on():
    concept = Concept("wide", "batex", "sd1", {"l": torch.ones(1, 768)}, state={"ranking": "dot"})
    text = ui_text(run_node(ConceptInfo, concept=concept, clip=tc.tiny_clip("sd1")))  # the tiny CLIP is 32-wide
    assert "(The vectors belong to another model (clip_l 768-wide, this CLIP's 32), so the vocabulary comparison " \
           "is skipped.)" in text
    assert "(The batex state in this concept is incomplete, so it is not shown.)" in text
