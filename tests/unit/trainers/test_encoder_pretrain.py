"""Encoder pretraining on the tiny host: concept codes teach the encoder which features make a concept."""

import pytest
import torch
from concept_forge.trainers.checkpoint import load_state
from concept_forge.trainers.encoder_pretrain import Example, PretrainOptions, pretrain, visible_devices
from concept_forge.trainers.tuning_encoder import EncoderConfig, TuningEncoder
from tiny_host import TinyHost

COLOURS = ("red", "blue")


class FeatureHost(TinyHost):
    """The tiny host with the UNet features pretraining reads (the latent's channel means)."""

    def unet_features(self, latents, noise, timesteps):
        return latents.mean(dim=(2, 3))


def examples(host):
    """Two dogs and two cats, each red or blue: the concept is (colour, word); vision features say the colour in
    one coordinate among noise."""
    g = torch.Generator().manual_seed(0)
    out = []
    for word in ("dog", "cat"):
        for colour, sign in (("red", 1.0), ("blue", -1.0)):
            for _ in range(3):
                vision = torch.randn(5, 12, generator=g) * 0.3
                vision[:, 0] += 2 * sign
                image = torch.rand(1, 32, 32, 3, generator=g)
                image[:, 8:24, 8:24] = torch.tensor([0.9, 0.2, 0.1] if sign > 0 else [0.1, 0.3, 0.9])
                out.append(Example(host.encode_images(image)[0].detach(), vision, word, None, f"{colour} {word}"))
    return out


class SpikyHost(FeatureHost):
    """The feature host whose loss is not finite on its `bad` calls (counted from 1)."""

    def __init__(self, bad):
        super().__init__()
        self.calls, self.bad = 0, set(bad)

    def loss(self, *args, **kwargs):
        self.calls += 1
        out = super().loss(*args, **kwargs)
        return out * float("nan") if self.calls in self.bad else out


def train(tmp_path, codes, steps=120, host=None, log=lambda line: None):
    host = host or FeatureHost()
    data = examples(host)
    config = EncoderConfig(12, 4, {"l": 16}, host.unet_targets(""), rank=2, hidden=32, code=8)
    encoder = TuningEncoder(config, seed=0)
    options = PretrainOptions(steps=steps, batch_size=4, learning_rate=1e-2, offset_penalty=0.0, contrastive=0.0,
                              blend=1.0, codes=codes, code_learning_rate=5e-3, checkpoint_every=steps, log_every=steps)
    pretrain(host, encoder, data, options, tmp_path, log=log)
    return host, data, encoder


def offsets(host, data, encoder):
    rows = {"l": torch.stack([host.vocabulary("l")[host.token_ids("l", e.class_word)] for e in data])}  # [N, 1, d]
    with torch.no_grad():
        vision, latents = torch.stack([e.vision for e in data]), torch.stack([e.latent for e in data])
        return (encoder(vision, host.unet_features(latents, None, None), rows).embeddings["l"] - rows["l"])[:, 0]


def test_concept_codes_pull_each_prediction_toward_its_own_concepts_code(tmp_path):
    host, data, encoder = train(tmp_path, codes=1.0)
    names = sorted({e.concept for e in data})
    codes = load_state(tmp_path / "state.safetensors").parameters[-1]  # the codes follow the encoder's parameters
    assert codes.shape == (4, 16) and codes.norm(dim=-1).min() > 0.05   # every concept's code was learned
    predicted = offsets(host, data, encoder)
    own = torch.stack([codes[names.index(e.concept)] for e in data])
    assert ((predicted - own).norm(dim=-1) < 0.25 * own.norm(dim=-1)).all()  # each prediction near its code
    for word in ("dog", "cat"):  # what tells red from blue in the predictions is what tells their codes apart
        mean = {c: predicted[[i for i, e in enumerate(data) if e.concept == f"{c} {word}"]].mean(0) for c in COLOURS}
        learned = codes[names.index(f"red {word}")] - codes[names.index(f"blue {word}")]
        predicted_gap = mean["red"] - mean["blue"]
        assert torch.cosine_similarity(predicted_gap, learned, dim=0) > 0.5


def test_without_codes_nothing_is_regressed_and_no_code_is_kept(tmp_path):
    host, data, encoder = train(tmp_path, codes=0.0, steps=2)
    state = load_state(tmp_path / "state.safetensors")
    assert len(state.parameters) == len(list(encoder.parameters()))   # no codes in the run
    assert state.fingerprint["concepts"] == 0



def test_a_step_with_non_finite_gradients_is_skipped_and_training_goes_on(tmp_path):
    for run in ("one", "spiked", "later"):
        (tmp_path / run).mkdir()
    _, _, one = train(tmp_path / "one", codes=0.0, steps=1)
    lines = []
    _, _, spiked = train(tmp_path / "spiked", codes=0.0, steps=2, host=SpikyHost(bad={5}), log=lines.append)
    assert all(torch.equal(a, b) for a, b in zip(one.parameters(), spiked.parameters(), strict=True))
    assert any("step 2: the gradients are not finite; skipped" in line for line in lines)
    _, _, later = train(tmp_path / "later", codes=0.0, steps=3, host=SpikyHost(bad={5}))
    assert all(torch.isfinite(p).all() for p in later.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), later.parameters(), strict=True))


def test_the_gradient_norm_limit_is_checked():
    with pytest.raises(ValueError, match="max_grad_norm must be at least 0"):
        PretrainOptions(steps=1, max_grad_norm=-1.0)


def torchrun_environment(visible, rank, world):
    """What torchrun gives a worker (world None: no LOCAL_WORLD_SIZE), with the user's CUDA_VISIBLE_DEVICES."""
    environ = {"TORCHELASTIC_RUN_ID": "run", "LOCAL_RANK": str(rank)}
    if world is not None:
        environ["LOCAL_WORLD_SIZE"] = str(world)
    if visible is not None:
        environ["CUDA_VISIBLE_DEVICES"] = visible
    return environ


@pytest.mark.parametrize("visible, rank, world, device", [
    (None, 1, 2, "1"),            # unset: process i gets GPU i
    ("2,3", 0, 2, "2"),           # the user's choice is kept, one card per process
    ("2, 3", 1, 2, "3"),
    ("0,1,", 1, 2, "1"),          # a trailing comma is no GPU
    ("GPU-5e1c", 0, 1, "GPU-5e1c"),  # one process on the one GPU a cluster launcher assigned
    ("", 1, 2, ""),               # GPUs hidden (a CPU run): stay hidden
    ("-1", 0, 2, "-1"),
    ("NoDevFiles", 1, 2, "NoDevFiles"),
    ("4,5", 1, None, "5"),        # LOCAL_WORLD_SIZE missing: the rank still gets its own card
])
def test_each_torchrun_process_sees_its_own_gpu(visible, rank, world, device):
    assert visible_devices(torchrun_environment(visible, rank, world)) == device


def test_outside_torchrun_the_visible_gpus_are_left_alone():
    assert visible_devices({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3"}) is None


def test_more_processes_than_visible_gpus_is_refused():
    with pytest.raises(ValueError, match="started 4 processes .* lists 2 GPU"):
        visible_devices(torchrun_environment("0,1", 3, 4))
    with pytest.raises(ValueError, match="started 3 processes .* lists 2 GPU"):
        visible_devices(torchrun_environment("0,1", 2, None))
