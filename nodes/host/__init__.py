"""The host: the trainers' interface (`trainers.host.Host`) on ComfyUI's models, one piece per side of the model."""

from .clip_text import ComfyCond, conditioning_layers
from .comfy_host import PRECISIONS, ComfyHost
from .embedding_lookup import tokenizer_with_lookup
from .families import ENCODER_KEYS, clip_arch, describe_clip, detect_arch, model_arch
from .weight_offsets import ATTENTION_PROJECTIONS

__all__ = ["ATTENTION_PROJECTIONS", "ENCODER_KEYS", "PRECISIONS", "ComfyCond", "ComfyHost", "clip_arch",
           "conditioning_layers", "describe_clip", "detect_arch", "model_arch", "tokenizer_with_lookup"]
