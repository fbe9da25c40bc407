import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from concept_forge.trainers.checkpoint import load_state, pack, save_state, unpack
from concept_forge.trainers.loop import LoopOptions, ResumeMismatch, TrainingSet, train
from concept_forge.trainers.methods import create_method, method_options
from concept_forge.trainers.templates import OBJECT_TEMPLATES
from tiny_host import TinyHost, tiny_images

ROOT = Path(__file__).resolve().parents[3]


class Cancel(Exception):
    pass


def run(method_name, steps, cancel_at=None, resume=None, every=10, seed=0, **loop):
    host = TinyHost("sdxl")
    options = method_options(method_name)
    if method_name == "catversion":
        options = type(options)(num_layers=2)
    prompts = ["dog"] if method_name == "catversion" else list(OBJECT_TEMPLATES)
    method = create_method(method_name, host, "teddy bear" if method_name != "catversion" else "dog", 0, options,
                           seed)
    saved = []

    def on_step(step, total, loss):
        if step == cancel_at:
            raise Cancel

    opts = LoopOptions(steps=steps, learning_rate=0.02, batch_size=2, seed=seed, flip_p=0.5, checkpoint_every=every,
                       heldout_draws=4, **loop)
    try:
        result = train(method, host, TrainingSet(tiny_images(), prompts), opts, on_step, saved.append, resume)
    except Cancel:
        result = None
    return method, result, saved


@pytest.mark.parametrize("method_name", ["ti", "dti", "catversion"])
@pytest.mark.parametrize("cancel_at", [20, 25])
def test_train_cancel_resume_equals_an_uninterrupted_run(method_name, cancel_at):
    full, full_result, _ = run(method_name, 40)
    _, _, saved = run(method_name, 40, cancel_at=cancel_at)
    assert [s.step for s in saved] == [10, 20]  # the step-25 cancel keeps step 20 and redoes 21–25
    resumed, resumed_result, _ = run(method_name, 40, resume=saved[-1])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert (a - b).abs().max() < 1e-6
    assert resumed_result.losses == pytest.approx(full_result.losses, abs=1e-6)
    assert resumed_result.heldout_before == full_result.heldout_before


def test_a_finished_run_continues_to_more_steps_exactly():
    longer, _, _ = run("ti", 30)
    _, _, saved = run("ti", 20)
    assert saved[-1].step == 20  # the last step is always checkpointed
    resumed, _, _ = run("ti", 30, resume=saved[-1])
    assert torch.allclose(longer.parameters()[0], resumed.parameters()[0], atol=1e-6)


def test_resuming_with_other_settings_is_refused_naming_them():
    _, _, saved = run("ti", 10)
    with pytest.raises(ResumeMismatch, match="seed: checkpoint 0, now 1"):
        run("ti", 20, resume=saved[-1], seed=1)


def test_checkpoints_round_trip_through_the_file(tmp_path):
    _, _, saved = run("dti", 10)
    path = save_state(saved[-1], tmp_path / "state.safetensors")
    back = load_state(path)
    assert back.step == 10 and back.fingerprint == saved[-1].fingerprint
    assert torch.equal(back.noise_generator, saved[-1].noise_generator)
    assert all(torch.equal(a, b) for a, b in zip(back.parameters, saved[-1].parameters, strict=True))
    resumed, _, _ = run("dti", 20, resume=back)
    reference, _, _ = run("dti", 20)
    assert torch.allclose(resumed.parameters()[0], reference.parameters()[0], atol=1e-6)


def test_pack_keeps_integer_keys_tuples_and_nested_tensors():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "mu": [torch.zeros(1, 2)]}]}
    tensors = {}
    back = unpack(pack(state, tensors), tensors)
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["exp_avg"], torch.ones(2))
    assert back["param_groups"][0]["betas"] == [0.9, 0.999] and len(tensors) == 3
    with pytest.raises(TypeError, match="cannot checkpoint a value of type object"):
        pack(object(), {})


def test_a_checkpoint_stays_valid_when_the_writer_is_killed_mid_write(tmp_path):
    path = tmp_path / "state.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("concept_forge", {str(ROOT / "__init__.py")!r},
                                                      submodule_search_locations=[{str(ROOT)!r}])
        module = importlib.util.module_from_spec(spec); sys.modules["concept_forge"] = module
        spec.loader.exec_module(module)
        from concept_forge.trainers.checkpoint import TrainState, save_state
        step = 0
        while True:
            step += 1
            big = torch.full((4_000_000,), float(step))  # 16 MB: each write takes a while
            save_state(TrainState(step, [big], {{}}, torch.zeros(8, dtype=torch.uint8), [], None), {str(path)!r})
            print(step, flush=True)
    """))
    writer = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            writer.stdout.readline()  # a few complete writes, then kill it in the middle of the next ones
        time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait()
    state = load_state(path)  # the last complete checkpoint, never a torn one
    assert state.step >= 3 and torch.all(state.parameters[0] == state.step)
