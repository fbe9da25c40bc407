"""The host: the trainers' interface (`trainers.host.Host`) on ComfyUI's models, one piece per side of the model."""

from .comfy_host import PRECISIONS, ComfyHost
from .embedding_lookup import tokenizer_with_lookup
from .families import (
    SD_ONLY,
    TEXT_ENCODER_CHOICES,
    TEXT_ENCODERS_TOOLTIP,
    clip_arch,
    describe_clip,
    detect_arch,
    encoder_keys,
    frozen_encoders,
    model_arch,
)
from .text_side import ComfyCond, conditioning_layers
from .weight_offsets import ATTENTION_PROJECTIONS

__all__ = ["ATTENTION_PROJECTIONS", "PRECISIONS", "SD_ONLY", "TEXT_ENCODER_CHOICES", "TEXT_ENCODERS_TOOLTIP",
           "ComfyCond", "ComfyHost", "clip_arch", "conditioning_layers", "describe_clip", "detect_arch",
           "encoder_keys", "frozen_encoders", "model_arch", "tokenizer_with_lookup"]
