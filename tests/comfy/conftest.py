import pytest
from comfy_tier import require_comfyui


@pytest.fixture
def model_folders(tmp_path):
    """ComfyUI's embeddings and concepts folders inside tmp_path."""
    require_comfyui().use_model_folders(tmp_path)
    return tmp_path
