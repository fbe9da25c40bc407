"""The loss chart in a real browser: headless Chromium (Debian's) driven by Playwright against the test server.

Skipped, saying why, when Chromium or Playwright is missing. Screenshots land in the test's tmp folder.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
from comfy_tier import require_comfyui

require_comfyui()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("browser test skipped: no Chromium (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test skipped: pip install playwright",
                               exc_type=ImportError)

from concept_forge.nodes.demo import DEMO_CHECKPOINT, DEMO_IMAGES  # noqa: E402
from ui_workflow import demo_images, with_widgets  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[2] / "example_workflows" / "learn_concept_ti.json"
ARGS = ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
CHART = "canvas.concept-forge-loss-chart"


@pytest.fixture(scope="module")
def page(server):
    # a first visit opens the template browser over the graph (ComfyUI >= 0.4 even after a while): a returning user
    server.post("/settings/Comfy.TutorialCompleted", True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        open_app(page, server.url)
        yield page
        browser.close()


def open_app(page, url=None):
    """Load the frontend and close the template dialog a first visit opens."""
    if url:
        page.goto(url)
    else:
        page.reload()
    page.wait_for_function("() => window.app && window.app.graph", timeout=60_000)
    deadline = time.time() + 10
    while time.time() < deadline:
        dialogs = page.locator(".p-dialog:visible")
        if dialogs.count():
            page.keyboard.press("Escape")
        elif time.time() > deadline - 7:  # nothing appeared for a few seconds
            break
        time.sleep(0.3)


def points(page):
    return page.evaluate(f"() => Number(document.querySelector('{CHART}')?.dataset.points ?? -1)")


def wait_for_points(page, at_least, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if points(page) >= at_least:
            return points(page)
        time.sleep(0.25)
    raise TimeoutError(f"the chart did not reach {at_least} points (has {points(page)})")


def test_the_chart_grows_while_training_runs_and_survives_a_reload(server, object_info, page, tmp_path):
    workflow = with_widgets(demo_images(json.loads(EXAMPLE.read_text()), DEMO_IMAGES), object_info, {
        "CheckpointLoaderSimple": {"ckpt_name": DEMO_CHECKPOINT},
        "ConceptForgeLearnConcept": {"steps": 150, "resolution": 64, "batch_size": 1, "name": "browser_dog"},
        "ConceptForgeSaveConcept": {"name": "browser_dog"},
        "EmptyLatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
    })
    page.evaluate("(workflow) => window.app.loadGraphData(workflow)", workflow)
    assert points(page) == 0  # an empty chart is on the node before anything runs
    page.locator(CHART).screenshot(path=str(tmp_path / "loss_chart_empty.png"))
    labels = page.evaluate("() => Object.fromEntries(window.app.graph.findNodesByType('ConceptForgeLearnConcept')[0]"
                           ".widgets.map((w) => [w.name, w.label ?? w.name]))")
    assert labels["learning_rate"] == "learning_rate (0 = method's)"  # a bare 0.0000 would read as a real 0
    assert labels["steps"] == "steps (0 = method's)" and labels["batch_size"] == "batch_size"
    page.evaluate("() => window.app.queuePrompt(0)")
    first = wait_for_points(page, 5)
    second = wait_for_points(page, first + 5)
    assert second > first  # the curve grows while training runs
    chart = page.locator(CHART)
    chart.screenshot(path=str(tmp_path / "loss_chart_live.png"))
    page.screenshot(path=str(tmp_path / "graph_live.png"))
    pixels = _curve_pixels(tmp_path / "loss_chart_live.png")
    assert pixels > 50, "the smoothed curve was not drawn"

    open_app(page)  # a reload forgets everything but the workflow; the server still trains
    replayed = wait_for_points(page, second, timeout=60)
    assert replayed >= second  # the history came back from the server
    later = wait_for_points(page, replayed + 3, timeout=120)
    assert later > replayed  # and live events keep coming after the reload
    server.post("/interrupt")


def _curve_pixels(path):
    from PIL import Image

    image = Image.open(path).convert("RGB")
    return sum(1 for r, g, b in image.get_flattened_data() if b > 200 and r > 140 and g < 190)  # the purple line
