import pytest
import torch
from concept_forge.trainers.loop import (
    LoopOptions,
    NonFiniteLoss,
    SamplePlan,
    TrainingSet,
    scaled_learning_rate,
    train,
)
from concept_forge.trainers.methods import init_vectors
from concept_forge.trainers.methods.ti import TextualInversion
from concept_forge.trainers.templates import OBJECT_TEMPLATES
from tiny_host import TinyHost, tiny_images


def ti_run(host=None, steps=10, seed=0, on_step=None, **options):
    host = host or TinyHost()
    method = TextualInversion(init_vectors(host, "dog"))
    data = TrainingSet(tiny_images(), list(OBJECT_TEMPLATES), masks=options.pop("masks", None))
    opts = LoopOptions(steps=steps, learning_rate=options.pop("learning_rate", 0.02), seed=seed,
                       batch_size=options.pop("batch_size", 2), **options)
    result = train(method, host, data, opts, on_step=on_step)
    return method, result


def test_learning_rate_scales_with_batch_and_accumulation():
    # DTI's SDXL recipe: 0.01 per sample at batch 4 is 0.04 (docs/METHODS.md §3b)
    assert scaled_learning_rate(0.01, 4, 1) == pytest.approx(0.04)
    assert scaled_learning_rate(5e-4, 1, 4) == pytest.approx(2e-3)  # BaTex: 5e-4 × 1 × 4


def plan_tensors(plan, micro_steps):
    draws = [plan[m] for m in range(micro_steps)]
    return [torch.stack([getattr(d, field) for d in draws]) for field in ("images", "flips", "prompts")]


def test_sample_plan_sees_every_image_equally_often():
    images, flips, prompts = plan_tensors(SamplePlan(4, 27, False, 3, 0.5, seed=0), 8)
    assert images.shape == (8, 3)
    assert torch.bincount(images.flatten(), minlength=4).tolist() == [6, 6, 6, 6]
    assert prompts.max() < 27 and 0 < int(flips.sum()) < 24


def test_any_micro_batch_is_drawn_alone_the_same_as_in_sequence():
    plan = SamplePlan(5, 27, False, 2, 0.5, seed=9)
    in_order = plan_tensors(plan, 30)
    later = SamplePlan(5, 27, False, 2, 0.5, seed=9)  # a resumed run starts mid-plan
    for micro in (29, 7, 0, 12):
        draws = later[micro]
        for field, whole in zip((draws.images, draws.flips, draws.prompts), in_order, strict=True):
            assert torch.equal(field, whole[micro])


def test_a_plan_for_a_huge_run_costs_nothing_up_front():
    # 100000 steps × batch 64 × accumulation 64, the UI's limits: nothing is drawn before it is asked for
    plan = SamplePlan(5, 27, False, 64, 0.5, seed=1)
    draws = plan[100000 * 64 - 1]
    assert draws.images.shape == (64,) and int(draws.images.max()) < 5


def test_captions_follow_their_image():
    images, _, prompts = plan_tensors(SamplePlan(3, 3, True, 2, 0.0, seed=1), 6)
    assert torch.equal(prompts, images)


def test_the_vae_runs_once_per_image_and_flipped_image_not_per_step():
    host = TinyHost()
    ti_run(host, steps=5, flip_p=0.5)
    assert host.encode_calls == 2 * 4


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_fifty_ti_steps_lower_the_heldout_loss(arch):
    _, result = ti_run(TinyHost(arch), steps=50, heldout_draws=16, learning_rate=0.05)
    assert result.heldout_after < result.heldout_before
    assert len(result.losses) == 50


def test_training_is_reproducible_from_the_seed():
    a, ra = ti_run(seed=3)
    b, rb = ti_run(seed=3)
    c, _ = ti_run(seed=4)
    assert ra.losses == rb.losses
    assert torch.equal(a.parameters()[0], b.parameters()[0])
    assert not torch.equal(a.parameters()[0], c.parameters()[0])


def test_nothing_but_the_method_parameters_gets_a_gradient():
    host = TinyHost()
    method, _ = ti_run(host, steps=3)
    for module in (host.text, host.vae, host.unet):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert method.parameters()[0].grad is None  # cleared after the last step


def test_cancel_from_the_callback_keeps_the_last_completed_step():
    class Cancel(Exception):
        pass

    def cancel_at_4(step, total, loss):
        if step == 4:
            raise Cancel

    with pytest.raises(Cancel):
        ti_run(steps=10, on_step=cancel_at_4)
    # the same run cut short: what a cancelled run keeps equals a 4-step run
    method_4, _ = ti_run(steps=4)
    host = TinyHost()
    method = TextualInversion(init_vectors(host, "dog"))
    with pytest.raises(Cancel):
        train(method, host, TrainingSet(tiny_images(), list(OBJECT_TEMPLATES)),
              LoopOptions(steps=10, learning_rate=0.02, batch_size=2), on_step=cancel_at_4)
    assert torch.equal(method.parameters()[0], method_4.parameters()[0])


class NaNAfter(TinyHost):
    """Returns a NaN loss from the `at`-th loss call on."""

    def __init__(self, at):
        super().__init__()
        self.at, self.calls = at, 0

    def loss(self, *args, **kwargs):
        self.calls += 1
        out = super().loss(*args, **kwargs)
        return out * float("nan") if self.calls >= self.at else out


def test_nan_loss_stops_with_its_step_and_keeps_the_last_finite_vectors():
    host = NaNAfter(at=6)
    method = TextualInversion(init_vectors(host, "dog"))
    data = TrainingSet(tiny_images(), list(OBJECT_TEMPLATES))
    with pytest.raises(NonFiniteLoss, match="at step 6 .*learning rate 0.02") as info:
        train(method, host, data, LoopOptions(steps=10, learning_rate=0.02, batch_size=2))
    assert info.value.step == 6
    reference, _ = ti_run(steps=5)
    assert torch.equal(method.parameters()[0], reference.parameters()[0])
    assert torch.isfinite(method.parameters()[0]).all()


def test_an_all_ones_mask_trains_exactly_like_no_mask():
    plain, r1 = ti_run(steps=4)
    masked, r2 = ti_run(steps=4, masks=torch.ones(4, 32, 32))
    assert torch.allclose(plain.parameters()[0], masked.parameters()[0], atol=1e-6)


class QuadraticHost(TinyHost):
    """Loss = ‖v − image_value‖² per sample, whatever the noise: the gradient depends only on which images."""

    def encode_images(self, images):
        return images.mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)

    def encode(self, prompts, vectors):
        return vectors["l"].sum(0).expand(len(prompts), -1)

    def loss(self, latents, cond, noise, timesteps, mask=None):
        return ((cond - latents.view(-1, 1)) ** 2).mean(1)


def test_gradient_accumulation_equals_the_larger_batch():
    runs = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        host = QuadraticHost()
        method = TextualInversion(init_vectors(host, "dog"))
        data = TrainingSet(tiny_images(n=5), list(OBJECT_TEMPLATES))
        result = train(method, host, data, LoopOptions(steps=6, learning_rate=0.1, batch_size=batch,
                                                       grad_accum=accum, seed=2))
        runs.append((method.parameters()[0].detach(), result.losses))
    for vectors, losses in runs[1:]:
        assert torch.allclose(vectors, runs[0][0], atol=1e-6)
        assert losses == pytest.approx(runs[0][1], abs=1e-6)


@pytest.mark.parametrize("field, value", [("steps", -1), ("batch_size", 0), ("learning_rate", float("nan")),
                                          ("flip_p", 1.5)])
def test_loop_options_refuse_nonsense(field, value):
    kwargs = {"steps": 1, "learning_rate": 0.1, field: value}
    with pytest.raises(ValueError, match=field):
        LoopOptions(**kwargs)


def test_the_heldout_curve_is_recorded_from_step_zero_every_n_steps():
    _, result = ti_run(steps=6, heldout_draws=4, heldout_every=2)
    assert [step for step, _ in result.heldout_curve] == [0, 2, 4, 6]
    assert result.heldout_curve[0][1] == result.heldout_before and result.heldout_curve[-1][1] == result.heldout_after
