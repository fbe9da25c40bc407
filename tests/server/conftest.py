import pytest
from comfy_tier import require_comfyui


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One headless ComfyUI with the pack for the whole server tier."""
    tc = require_comfyui()
    from comfy_server import ComfyServer

    s = ComfyServer(tc.COMFYUI_PATH, tmp_path_factory.mktemp("server"))
    yield s
    s.stop()


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info")
