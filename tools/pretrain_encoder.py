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
    if "LOCAL_RANK" in os.environ:  # one GPU per process: set before torch sees the devices
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", os.environ["LOCAL_RANK"])
    spec = importlib.util.spec_from_file_location("concept_forge", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["concept_forge"] = package
    spec.loader.exec_module(package)
    from concept_forge.nodes import encoder_pretraining

    sys.exit(encoder_pretraining.main())
