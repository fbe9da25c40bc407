"""The pretrained encoder on what neither the benchmark nor pretraining holds: the pairs kept out of both
(`pretrain.UNSEEN_PAIRS`) from one reference each, through the Tuning Encoder node, on prompts the benchmark does
not score; the judge reads what they draw.

    COMFYUI_PATH=/opt/comfyui python bench/toyworld/spot_check.py          # -> bench/results/toyworld_spot_check.json

Each prompt gets 16 images (fixed sampler seeds); "identity" is colour and shape both right, and a prompt that
asks for a size or a position is also scored on obeying it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run as a script: make `toyworld` importable

from toyworld import benchmark, protocol, world  # noqa: E402
from toyworld.judge import predict  # noqa: E402
from toyworld.pretrain import UNSEEN_PAIRS, class_word  # noqa: E402
from toyworld.sampling import generate  # noqa: E402

# (prompt with {} for the concept, size asked, position asked): none is a scored prompt of the benchmark
PROMPTS = (("a {} on a grey background", None, None), ("a small {} at the top", "small", "top"),
           ("a big {} on the right", "big", "right"))
IMAGES = 16
RESULT = benchmark.ROOT / "bench" / "results" / "toyworld_spot_check.json"


# The reference as the pretraining folder captions its images (bench/toyworld/pretrain.py): its size and position
REFERENCE_CAPTION = world.layout_caption(*world.CENTRED_LAYOUT)


def reference(colour: str, shape: str, seed: int) -> torch.Tensor:
    """One big, centred reference [1, RES, RES, 3] in 0..1."""
    image = world.render((colour, shape, *world.CENTRED_LAYOUT), np.random.default_rng(seed))[0]
    return torch.from_numpy(image[None]).float() / 255


def check(scorer: benchmark.Scorer, colour: str, shape: str, steps: int, seed: int,
          tuning: Mapping[str, Any], generation_blends: Sequence[float] = (1.0,)) -> list[dict[str, Any]]:
    """Rows per prompt and generation blend (α of Tuning Encoder Dual Path; 1: the Tuning Encoder's own model);
    `tuning`: Tuning Encoder inputs set (encoder, learning_rate, blend, contrastive and its k and τ)."""
    import folder_paths
    from concept_forge.nodes.dual_path import TuningEncoderDualPath
    from concept_forge.nodes.paths import ENCODERS
    from concept_forge.nodes.tuning import NO_ENCODER, TuningEncoderNode

    name = f"{colour}{shape}"
    vision = {} if tuning["encoder"] == NO_ENCODER else {"clip_vision": scorer.clip_vision(
        Path(folder_paths.get_full_path_or_raise(ENCODERS, tuning["encoder"])))}
    model, clip, concept, _ = benchmark.run_node(
        TuningEncoderNode, **{**benchmark.node_defaults(TuningEncoderNode), "model": scorer.model,
                              "clip": scorer.clip, "vae": scorer.vae, "image": reference(colour, shape, seed),
                              "name": name, "class_word": class_word(shape), "resolution": world.RES, "seed": seed,
                              "tuning_steps": steps, **tuning, **vision})
    rows = []
    for (i, (text, size, position)), blend in itertools.product(enumerate(PROMPTS), generation_blends):
        prompt, positive, sampled = text.format(f"embedding:{name}"), None, model
        if blend < 1:
            sampled, positive, _ = benchmark.run_node(TuningEncoderDualPath, model=scorer.model, clip=scorer.clip,
                                                      concept=concept, text=prompt, blend=blend)
        preds, _ = predict(scorer.judge, generate(sampled, clip, scorer.vae, prompt, IMAGES, 9000 + i,
                                                  positive=positive))
        identity = (preds[:, 0] == world.COLOUR_NAMES.index(colour)) & (preds[:, 1] == world.SHAPES.index(shape))
        row: dict[str, Any] = {"pair": f"{colour} {shape}", "steps": steps, **tuning, "generation_blend": blend,
                               "seed": seed, "prompt": text,
                               "n": IMAGES, "identity": int(identity.sum())}
        if size:
            row["size"] = int((preds[:, 2] == world.SIZES.index(size)).sum())
        if position:
            row["position"] = int((preds[:, 3] == world.POSITIONS.index(position)).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 12])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=0.0, help="tuning rate per step (0: the node's)")
    parser.add_argument("--encoder", type=Path, default=benchmark.WEIGHTS / protocol.ENCODERS["full"],
                        help="encoder weights (default: the shipped toy-world encoder); none: the node without "
                        "encoder weights, a plain LoRA + embedding tuner")
    parser.add_argument("--blend", type=float, default=0.8, help="α of the dual path while tuning (the node's)")
    parser.add_argument("--contrastive", type=float, default=0.01, help="the contrastive term's weight (the node's)")
    parser.add_argument("--contrastive-k", type=int, default=3, help="the contrastive term's positives (the node's)")
    parser.add_argument("--contrastive-temperature", type=float, default=0.07, help="its τ (the node's)")
    parser.add_argument("--batch-size", type=int, default=0, help="samples per tuning step (0: the node's, 8 "
                        "with --caption, else one)")
    parser.add_argument("--caption", nargs="?", const=REFERENCE_CAPTION, default="", help="tune with this caption "
                        "of the reference ({} marks the concept), not the node's templates; alone: the reference's "
                        "caption as pretraining captions its images ('a photo of a big {} in the center')")
    parser.add_argument("--generation-blend", type=float, nargs="+", default=[1.0], help="α of Tuning Encoder "
                        "Dual Path at generation (1: the Tuning Encoder's model, no dual path)")
    parser.add_argument("--out", type=Path, default=RESULT)
    opts = parser.parse_args(argv)
    benchmark.import_pack()
    benchmark.use_scratch_folders()
    scorer = benchmark.Scorer()
    import folder_paths
    from concept_forge.nodes.paths import ENCODERS
    from concept_forge.nodes.tuning import NO_ENCODER

    if str(opts.encoder) != NO_ENCODER and opts.encoder.name not in folder_paths.get_filename_list(ENCODERS):
        shutil.copyfile(opts.encoder, Path(folder_paths.get_folder_paths(ENCODERS)[0]) / opts.encoder.name)
        folder_paths.filename_list_cache.clear()
    tuning = {"encoder": opts.encoder.name, "learning_rate": opts.learning_rate, "blend": opts.blend,
              "contrastive": opts.contrastive, "contrastive_k": opts.contrastive_k,
              "contrastive_temperature": opts.contrastive_temperature,
              "batch_size": opts.batch_size,
              "captions": opts.caption}
    rows = [row for colour, shape in sorted(UNSEEN_PAIRS) for steps in opts.steps
            for row in check(scorer, colour, shape, steps, opts.seed, tuning, opts.generation_blend)]
    opts.out.write_text(json.dumps(rows, indent=1) + "\n")
    for steps, blend in itertools.product(opts.steps, opts.generation_blend):
        mine = [r for r in rows if r["steps"] == steps and r["generation_blend"] == blend]
        asked = [r for r in mine if "position" in r]
        print(f"{steps} steps, generation blend {blend:g}: identity "
              f"{sum(r['identity'] for r in mine) / (IMAGES * len(mine)):.2f}, size "
              f"{sum(r['size'] for r in asked) / (IMAGES * len(asked)):.2f}, position "
              f"{sum(r['position'] for r in asked) / (IMAGES * len(asked)):.2f} ({len(mine)} prompts)")


if __name__ == "__main__":
    main()
