import pytest
import torch
import torch.nn.functional as F
from concept_forge.trainers.encoder_pretrain import read_folder, shard
from concept_forge.trainers.tuning_encoder import (
    EMBED_SCALE,
    EncoderConfig,
    TuningEncoder,
    contrastive_loss,
    load_encoder,
    mismatches,
    nearest_tokens,
    save_encoder,
)

TARGETS = [("diffusion_model.a.attn1.to_q.weight", 5, 7), ("diffusion_model.b.attn2.to_k.weight", 4, 6)]
CONFIG = EncoderConfig(vision_width=12, unet_width=20, text_widths={"l": 8, "g": 6}, targets=TARGETS, rank=3, hidden=16)


def features(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 9, 12, generator=g), torch.randn(batch, 20, generator=g)


def test_an_untrained_encoder_predicts_the_class_word_and_no_offsets():
    encoder = TuningEncoder(CONFIG)
    rows = {"l": torch.randn(2, 8), "g": torch.randn(2, 6)}
    p = encoder(*features(), rows)
    assert p.embeddings["l"].shape == (2, 2, 8) and torch.equal(p.embeddings["l"][1], rows["l"])
    assert [u.shape for u in p.up] == [(2, 5, 3), (2, 4, 3)] and all(torch.count_nonzero(u) == 0 for u in p.up)
    assert [d.shape for d in p.down] == [(3, 7), (3, 6)]


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
    assert float(contrastive_loss(table[:1] * 2, table)) == pytest.approx(0.0, abs=1e-6)  # a batch of one: no negatives
    apart = contrastive_loss(torch.stack([table[0], table[1]]), table, k=1)
    together = contrastive_loss(torch.stack([table[0], table[0] + 0.01 * table[1]]), table, k=1)
    assert float(apart) < float(together)
    assert nearest_tokens(torch.tensor([[0.1, 0.9, 0.0, 0.0]]), table).tolist() == [[1]]


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


def test_image_folders_give_class_words_and_shards_split_them(tmp_path):
    for word in ("dog", "teddy_bear"):
        (tmp_path / word).mkdir()
        (tmp_path / word / "1.png").write_bytes(b"")
    assert [w for _, w in read_folder(tmp_path)] == ["dog", "teddy bear"]
    (tmp_path / "captions.txt").write_text("dog/1.png\tpuppy\nbad line\n")
    with pytest.raises(ValueError, match="captions.txt line 2"):
        read_folder(tmp_path)
    assert shard(5, 0, 2) == [0, 2, 4] and shard(5, 1, 2) == [1, 3]
