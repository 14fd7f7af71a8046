"""The web app in a real headless browser: upload an image, read the label, switch the task, read the new label.

Uses Debian's chromium (``apt-get install -y chromium``) driven by Playwright; it never downloads a browser.
Screenshots go to ``test-artifacts/`` at the repository root.
"""

import socket
from pathlib import Path

import pytest

from adaptkit.registry import Registry
from adaptkit.train import TrainConfig, train

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
CLASSES = sorted(p.name for p in (CIFAR_MINI / "test").iterdir()) if CIFAR_MINI.is_dir() else []
TIMEOUT_MS = 60_000  # the first prediction loads the backbone; CI machines can be slow

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: apt-get install -y chromium"),
    pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"),  # gradio's
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from adaptkit_app.main import launch

    reg = Registry(tmp_path_factory.mktemp("browser-registry") / "registry.db")
    for name, method in {"ada": "adapter", "lo": "lora"}.items():
        train(f"folder:{CIFAR_MINI}", task=name, backbone="vit_pico_patch4_32", pretrained=False, method=method,
              config=TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_eval=32), registry=reg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = launch(reg.url, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield app.local_url
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        try:
            yield page
        finally:
            browser.close()


def test_upload_predict_and_switch_task(page):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    expect(page.locator("#task input")).to_have_value(_starts_with("ada · adapter"))
    page.locator("#image input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "cat" / "0000.jpg"))
    expect(page.locator("#timing")).to_contain_text("ada@1 predicted in")
    first = page.locator("#labels [data-testid=label-output-value]").inner_text()
    assert first in CLASSES

    page.locator("#task input").click()
    page.get_by_role("option", name="lo · lora").click()
    expect(page.locator("#timing")).to_contain_text("lo@1 predicted in")  # same image, new task, no new upload
    second = page.locator("#labels [data-testid=label-output-value]").inner_text()
    assert second in CLASSES
    expect(page.get_by_role("option")).to_have_count(0)  # the task list has closed
    page.screenshot(path=str(ARTIFACTS / "app-predict.png"), full_page=True)


def test_compare_tab_draws_the_table_and_charts(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    expect(page.get_by_text("smaller", exact=False).first).to_be_visible()
    expect(page.locator("canvas, svg.marks").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "app-compare.png"), full_page=True)


def test_auto_routes_and_all_tasks_marks_the_choice(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Predict").click()
    page.locator("#image input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "ship" / "0001.jpg"))
    page.locator("#task input").click()
    page.get_by_role("option", name="Auto: which task?").click()
    expect(page.locator("#timing")).to_contain_text("Routed to")
    expect(page.locator("#timing")).to_contain_text("% sure")
    assert page.locator("#labels [data-testid=label-output-value]").inner_text() in CLASSES
    page.screenshot(path=str(ARTIFACTS / "app-auto.png"), full_page=True)
    page.get_by_role("tab", name="All tasks").click()
    page.locator("#all-image input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "ship" / "0001.jpg"))
    expect(page.locator("text=router's choice >> visible=true").first).to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "app-all-tasks-routed.png"), full_page=True)


def _starts_with(prefix: str):
    import re

    return re.compile("^" + re.escape(prefix))
