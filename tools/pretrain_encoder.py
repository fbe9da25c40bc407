#!/usr/bin/env python3
"""Pretrain the Tuning Encoder (see nodes/encoder_pretraining.py). Run it with torchrun for several processes:

    torchrun --nproc_per_node 2 tools/pretrain_encoder.py --checkpoint ... --clip-vision ... --data ... --run-dir ...
"""

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = package
    spec.loader.exec_module(package)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: one GPU per process, set before CUDA initialises
        from concept_forge.trainers.encoder_pretrain import visible_devices

        try:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(
                os.environ.get("CUDA_VISIBLE_DEVICES"), int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError as e:
            sys.exit(f"Encoder pretraining: {e}")
    from concept_forge.nodes import encoder_pretraining

    sys.exit(encoder_pretraining.main())
