"""The pack's custom socket types (namespaced, docs/COMFYUI.md §5.4)."""

from comfy_api.v0_0_2 import io

ConceptIO = io.Custom("CONCEPT_FORGE_CONCEPT")
TrainingOptionsIO = io.Custom("CONCEPT_FORGE_TRAINING_OPTIONS")
MethodOptionsIO = io.Custom("CONCEPT_FORGE_METHOD_OPTIONS")

CATEGORY = "concept_forge"
OPTIONS_CATEGORY = "concept_forge/options"
