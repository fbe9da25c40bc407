import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from concept_forge.trainers.encoder_pretrain import PretrainOptions, read_folder, shard
from concept_forge.trainers.methods import tuning_encoder as tuning
from concept_forge.trainers.tuning_encoder import (
    EMBED_SCALE,
    EncoderConfig,
    TuningEncoder,
    contrastive_loss,
    load_encoder,
    mismatches,
    nearest_tokens,
    save_encoder,
    signature_image,
    vision_metadata,
    vision_problem,
    vision_signature,
)
from safetensors.torch import save_file
from tiny_host import TinyHost

TARGETS = [("diffusion_model.a.attn1.to_q.weight", 5, 7), ("diffusion_model.b.attn2.to_k.weight", 4, 6)]
CONFIG = EncoderConfig(vision_width=12, unet_width=20, text_widths={"l": 8, "g": 6}, targets=TARGETS, rank=3, hidden=16)


def features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 9, 12, generator=g), torch.randn(batch, 20, generator=g)


def test_an_untrained_encoder_predicts_the_class_word_and_no_offsets():
    for hypernetwork in ("offsets", "scales"):
        encoder = TuningEncoder(replace(CONFIG, hypernetwork=hypernetwork))
        rows = {"l": torch.randn(2, 8), "g": torch.randn(2, 6)}
        p = encoder(*features(), rows)
        assert p.embeddings["l"].shape == (2, 2, 8) and torch.equal(p.embeddings["l"][1], rows["l"])
        assert [u.shape for u in p.up] == [(2, 5, 3), (2, 4, 3)] and all(torch.count_nonzero(u) == 0 for u in p.up)
        assert [d.shape for d in p.down] == [(2, 3, 7), (2, 3, 6)]
        assert all(torch.equal(d[0], d[1]) for d in p.down)  # no head yet: one down for every image


def test_the_offsets_hypernetwork_predicts_distinct_factors_per_image():
    encoder = TuningEncoder(CONFIG)
    with torch.no_grad():
        for head in [*encoder.up_heads, *encoder.down_heads]:
            head.weight.normal_(0, 0.5)
    p = encoder(*features(), {"l": torch.zeros(1, 8), "g": torch.zeros(1, 6)})
    for up, down, base in zip(p.up, p.down, encoder.base_down, strict=True):
        assert (up[0] - up[1]).abs().min() > 0 and (down[0] - down[1]).abs().min() > 0
        assert not torch.allclose(down[0], base)
    delta = p.up[0][1] @ p.down[0][1]                                        # [out, in] of image 1
    assert delta.shape == (5, 7) and delta.abs().max() > 0


def test_the_scales_hypernetwork_scales_learned_factors():
    encoder = TuningEncoder(replace(CONFIG, hypernetwork="scales"))
    with torch.no_grad():
        encoder.scale_head.bias.copy_(torch.arange(6.0))
    p = encoder(*features(), {"l": torch.zeros(1, 8), "g": torch.zeros(1, 6)})
    assert torch.equal(p.up[1][0], encoder.lora_up[1] * torch.tensor([3.0, 4.0, 5.0]))
    assert torch.equal(p.down[1][1], encoder.lora_down[1])


def test_configs_round_trip_and_legacy_files_load_as_scales():
    assert CONFIG.hypernetwork == "offsets" and EncoderConfig.from_json(CONFIG.to_json()) == CONFIG
    scales = replace(CONFIG, hypernetwork="scales", code=8)
    assert EncoderConfig.from_json(scales.to_json()) == scales
    legacy = json.loads(CONFIG.to_json())
    del legacy["hypernetwork"], legacy["code"]
    assert EncoderConfig.from_json(json.dumps(legacy)) == replace(CONFIG, hypernetwork="scales")
    with pytest.raises(ValueError, match="hypernetwork must be one of offsets, scales, got 'lora'"):
        replace(CONFIG, hypernetwork="lora")


def test_a_trained_head_moves_the_embedding_by_the_scaled_offset_per_image():
    encoder = TuningEncoder(CONFIG)
    with torch.no_grad():
        encoder.embedding_heads["l"].bias.fill_(1.0)
    rows = {"l": torch.zeros(2, 1, 8), "g": torch.zeros(2, 1, 6)}  # a class word per image
    p = encoder(*features(), rows)
    assert torch.allclose(p.embeddings["l"], torch.full((2, 1, 8), EMBED_SCALE))


def test_weights_follow_the_seed_not_the_global_random_stream():
    torch.manual_seed(123)
    a = TuningEncoder(CONFIG, seed=5)
    torch.manual_seed(456)
    b = TuningEncoder(CONFIG, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_contrastive_term_pulls_toward_real_words_and_apart():
    table = F.normalize(torch.eye(4), dim=-1)
    apart = contrastive_loss(torch.stack([table[0], table[1]]), table, k=1)
    together = contrastive_loss(torch.stack([table[0], table[0] + 0.01 * table[1]]), table, k=1)
    assert float(apart) < float(together)
    assert nearest_tokens(torch.tensor([[0.1, 0.9, 0.0, 0.0]]), table).tolist() == [[1]]


def test_contrastive_term_of_one_embedding_falls_as_it_moves_to_its_nearest_rows():
    g = torch.Generator().manual_seed(0)
    table, start = torch.randn(40, 8, generator=g), torch.randn(1, 8, generator=g)
    nearest = table[nearest_tokens(start, table)[0, 0]]
    losses = [float(contrastive_loss(torch.lerp(start, nearest, t), table)) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert losses[0] > 0.5 and all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_contrastive_term_counts_the_vocabulary_negatives():
    e = torch.tensor([[1.0, 0.8, 0.0, 0.0]])
    table = torch.eye(4)
    cos = F.normalize(e, dim=-1)[0] / 0.07                                 # cos(e, rows) / τ
    # k = 1: row 0 the positive, rows 1..3 the negatives (all, or the hardest one)
    expected = -(cos[0] - torch.logsumexp(cos, 0))
    assert float(contrastive_loss(e, table, k=1)) == pytest.approx(float(expected), rel=1e-4)
    assert float(contrastive_loss(e, table, k=1, negatives=1)) == pytest.approx(
        float(-(cos[0] - torch.logaddexp(cos[0], cos[1]))), rel=1e-4)
    far = table.clone()
    far[1] = -far[1]                                                        # the close negative moved away
    assert float(contrastive_loss(e, far, k=1)) < 0.01 * float(contrastive_loss(e, table, k=1))
    assert float(contrastive_loss(e, table, k=1, negatives=0)) == pytest.approx(0.0, abs=1e-6)


def test_tuning_adds_the_contrastive_term_per_embedding_row_and_zero_turns_it_off():
    host = TinyHost()
    table = host.vocabulary("l")
    off = tuning.Options(offset_penalty=0.0, contrastive=0.0)
    assert tuning.build(host, "dog", 0, off).regularizer() is None
    method = tuning.build(host, "teddy bear", 0, tuning.Options(offset_penalty=0.0, contrastive=0.5))
    rows = method.embeddings["l"]                                          # [2, d]: "teddy", "bear"
    term = method.regularizer()
    expected = 0.5 * (contrastive_loss(rows[:1], table) + contrastive_loss(rows[1:], table)) / 2
    assert float(term.detach()) == pytest.approx(float(expected.detach()), rel=1e-6) and float(term.detach()) > 0
    term.backward()
    assert rows.grad.abs().max() > 0
    sharp = tuning.Options(offset_penalty=0.0, contrastive=0.5, contrastive_k=1, contrastive_temperature=0.5)
    method = tuning.build(host, "teddy bear", 0, sharp)
    rows = method.embeddings["l"]
    expected = 0.5 * (contrastive_loss(rows[:1], table, 1, 0.5) + contrastive_loss(rows[1:], table, 1, 0.5)) / 2
    assert float(method.regularizer().detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert float(expected) != pytest.approx(float(term.detach()), rel=1e-3)  # k and τ reach the term


@pytest.mark.parametrize("batch_size, images, captioned, samples, split", [
    (0, 1, True, 8, (1, 8)),      # one captioned reference: 8 samples, one image a pass
    (0, 1, False, 1, (1, 1)),     # uncaptioned: one per image, the layout is not folded into the concept
    (0, 3, True, 8, (3, 3)),      # 8 samples over 3 images: 3 passes of 3 (9 ≥ 8, never fewer than asked)
    (0, 12, True, 12, (12, 1)),   # more images than the default: each image once
    (0, 12, False, 12, (12, 1)),
    (5, 2, False, 5, (2, 3)),     # an explicit batch wins, captioned or not
    (5, 2, True, 5, (2, 3)),
])
def test_a_steps_samples_run_as_passes_of_at_most_one_image_set(batch_size, images, captioned, samples, split):
    assert tuning.samples_per_step(batch_size, images, captioned) == samples
    assert tuning.passes_per_step(samples, images) == split


@pytest.mark.parametrize("options, refusal", [
    ({"contrastive_k": 0}, "contrastive_k must be a whole number from 1 to 64, got 0"),
    ({"contrastive_k": 2.5}, "contrastive_k must be a whole number"),
    ({"contrastive_temperature": 0.0}, "contrastive_temperature must be above 0, got 0.0"),
    ({"contrastive_temperature": float("nan")}, "contrastive_temperature must be above 0, got nan"),
])
def test_the_contrastive_terms_k_and_temperature_are_checked(options, refusal):
    with pytest.raises(ValueError, match=refusal):
        tuning.Options(**options)
    with pytest.raises(ValueError, match=refusal):
        PretrainOptions(steps=1, **options)


def test_encoder_files_round_trip_and_refuse_another_model(tmp_path):
    encoder = TuningEncoder(CONFIG, seed=2)
    path = save_encoder(encoder, tmp_path / "enc.safetensors")
    back = load_encoder(path)
    assert back.config == CONFIG
    pairs = zip(back.state_dict().values(), encoder.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    other = EncoderConfig(12, 24, {"l": 8, "g": 6}, CONFIG.targets[:1], 3, 16)
    assert mismatches(CONFIG, other) == ["unet_width 20 (the model needs 24)",
                                         "2 LoRA targets (the model has 1 of this kind)"]


def test_a_vision_signature_tells_models_apart_and_survives_half_precision():
    image = signature_image()
    assert image.shape == (1, 64, 64, 3) and 0 <= image.min() and image.max() <= 1
    assert torch.equal(image, signature_image())
    towers = [torch.nn.Linear(3, 32) for _ in range(6)]
    with torch.no_grad():
        features = [tower(image.reshape(1, -1, 3)) for tower in towers]           # [1, 4096, 32] tokens each
        half = towers[0].half()(image.reshape(1, -1, 3).half())
    ours = vision_signature(features[0])
    assert vision_signature(half) != ours and vision_problem(_signed(ours), vision_signature(half)) is None
    assert all(vision_problem(_signed(ours), vision_signature(f)) for f in features[1:])
    assert vision_problem(TuningEncoder(CONFIG), vision_signature(features[1])) is None  # unsigned: older files


def _signed(signature, name="tower.safetensors"):
    encoder = TuningEncoder(CONFIG)
    encoder.vision_signature, encoder.vision_name = signature, name
    return encoder


def test_an_encoder_file_keeps_the_vision_model_it_was_pretrained_with(tmp_path):
    features = torch.randn(1, 9, 12, generator=torch.Generator().manual_seed(4))
    path = save_encoder(TuningEncoder(CONFIG), tmp_path / "enc.safetensors",
                        {"checkpoint": "a.safetensors", **vision_metadata("vit.safetensors", features)})
    back = load_encoder(path)
    assert (back.made_for, back.vision_name) == ("a.safetensors", "vit.safetensors")
    assert back.vision_signature == vision_signature(features)
    assert vision_problem(back, vision_signature(-features)) == (
        "the CLIP vision model wired to clip_vision is not the one it was pretrained with, vit.safetensors")


def _forged(tmp_path, tensors=None, **metadata):
    state = TuningEncoder(CONFIG).state_dict() if tensors is None else tensors
    path = tmp_path / "forged.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path),
              {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    return path


@pytest.mark.parametrize("forgery, reason", [
    ({}, "no concept_forge_encoder metadata"),
    ({"concept_forge_encoder": "{not json"}, "its metadata is not JSON"),
    ({"concept_forge_encoder": "[1, 2]"}, "TypeError"),
    ({"concept_forge_encoder": {**json.loads(CONFIG.to_json()), "hidden": "wide"}}, "TypeError"),
    ({"concept_forge_encoder": {**json.loads(CONFIG.to_json()), "vision_width": 10**12}},
     "tensors are not the ones its config describes"),
    ({"concept_forge_encoder": {**json.loads(CONFIG.to_json()), "targets": [["x", 10**6, 10**6]] * 10**5}},
     "more LoRA targets than it holds tensors"),
    ({"concept_forge_encoder": CONFIG.to_json(), "clip_vision_signature": "[1, 2]"}, "is not 16 numbers"),
    ({"concept_forge_encoder": CONFIG.to_json(), "clip_vision_signature": json.dumps([float("nan")] * 16)},
     "is not 16 numbers"),
])
def test_a_forged_encoder_file_is_refused_with_its_reason(tmp_path, forgery, reason):
    refusal = f"^forged.safetensors is not a usable Concept Forge tuning encoder: .*{reason}"
    with pytest.raises(ValueError, match=refusal):
        load_encoder(_forged(tmp_path, **forgery))


def test_an_encoder_file_with_non_finite_or_missing_weights_is_refused(tmp_path):
    state = TuningEncoder(CONFIG).state_dict()
    poisoned = {**state, "trunk.1.weight": torch.full_like(state["trunk.1.weight"], float("nan"))}
    with pytest.raises(ValueError, match="weights are not all finite"):
        load_encoder(_forged(tmp_path, poisoned, concept_forge_encoder=CONFIG.to_json()))
    missing = {k: v for k, v in state.items() if k != "trunk.1.weight"}
    with pytest.raises(ValueError, match="tensors are not the ones its config describes"):
        load_encoder(_forged(tmp_path, missing, concept_forge_encoder=CONFIG.to_json()))
    (tmp_path / "torn.safetensors").write_bytes(_forged(tmp_path, concept_forge_encoder=CONFIG.to_json())
                                                .read_bytes()[:300])
    with pytest.raises(ValueError, match="^torn.safetensors is not a usable"):
        load_encoder(tmp_path / "torn.safetensors")


def test_image_folders_give_class_words_and_shards_split_them(tmp_path):
    for word in ("dog", "teddy_bear"):
        (tmp_path / word).mkdir()
        (tmp_path / word / "1.png").write_bytes(b"")
    assert [w for _, w, _, _ in read_folder(tmp_path)] == ["dog", "teddy bear"]
    (tmp_path / "captions.txt").write_text("dog/1.png\tpuppy\nteddy_bear/1.png\tbear\ta small {} on the left\n"
                                           "dog/2.png\tdog\t\trex\n")
    assert [(p.name, w, t, c) for p, w, t, c in read_folder(tmp_path)] == [
        ("1.png", "puppy", None, None), ("1.png", "bear", "a small {} on the left", None),
        ("2.png", "dog", None, "rex")]
    for bad in ("bad line", "dog/1.png\tpuppy\ta prompt without the concept"):
        (tmp_path / "captions.txt").write_text(f"dog/1.png\tpuppy\n{bad}\n")
        with pytest.raises(ValueError, match="captions.txt line 2"):
            read_folder(tmp_path)
    assert shard(5, 0, 2) == [0, 2, 4] and shard(5, 1, 2) == [1, 3]
