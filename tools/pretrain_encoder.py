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
    from concept_forge.trainers.encoder_pretrain import visible_devices

    try:  # one GPU per torchrun process, set before torch initialises CUDA
        devices = visible_devices(os.environ)
    except ValueError as e:
        sys.exit(f"Encoder pretraining: {e}")
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    from concept_forge.nodes import encoder_pretraining

    sys.exit(encoder_pretraining.main())
