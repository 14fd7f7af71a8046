"""The web app in a real headless browser: what a person sees on each tab.

Uses Debian's chromium (``apt-get install -y chromium``) driven by Playwright; it never downloads a browser.
Screenshots of every tab (several tasks, a prediction, a training in progress, an error) go to ``test-artifacts/`` at
the repository root, at 1280x800 and at 800 px wide.
"""

import re
import time
from pathlib import Path

import pytest
from ports import free_port

from adaptkit.registry import Registry
from adaptkit.training import TrainConfig, train

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CIFAR_MINI = ROOT.parent / "shared" / "data" / "cifar10-mini"
CLASSES = sorted(p.name for p in (CIFAR_MINI / "test").iterdir()) if CIFAR_MINI.is_dir() else []
TIMEOUT_MS = 60_000  # the first prediction loads the backbone; CI machines can be slow
TASKS = {"ada": "adapter", "lo": "lora", "probe": "linear"}
WIDTHS = {"1280": (1280, 800), "800": (800, 900)}
NO_WORD_SPLIT = """e => {  // true when no word (between spaces and hyphens) of the text is split across lines
  const node = e.firstChild;
  if (!node) return true;
  for (const m of node.textContent.matchAll(/[^ -]+/g)) {
    const range = document.createRange();
    range.setStart(node, m.index);
    range.setEnd(node, m.index + m[0].length);
    if (range.getClientRects().length > 1) return false;
  }
  return true;
}"""

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: apt-get install -y chromium"),
    pytest.mark.skipif(not CIFAR_MINI.is_dir(), reason=f"{CIFAR_MINI} not present"),
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated"),  # gradio's
]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from adaptkit_app.main import launch

    reg = Registry(tmp_path_factory.mktemp("browser-registry") / "registry.db")
    for name, method in TASKS.items():
        train(f"folder:{CIFAR_MINI}", task=name, backbone="vit_pico_patch4_32", pretrained=False, method=method,
              config=TrainConfig(epochs=1, batch_size=32, limit_train=64, limit_eval=32), registry=reg)
    port = free_port()
    app = launch(reg.url, port=port, prevent_thread_lock=True, quiet=True, data_roots=[CIFAR_MINI.parent])
    try:
        yield app.local_url
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(app_url):
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(TIMEOUT_MS)
        sync_api.expect.set_options(timeout=TIMEOUT_MS)
        page.goto(app_url)
        try:
            yield page
        finally:
            browser.close()


def shoot(page, name: str, redraw=None) -> None:
    """Screenshots of the page as it is now, at 1280x800 and at 800 px wide (whole page).

    ``redraw()`` runs after each resize: a table sizes its columns when its data arrive, not when the window changes.
    """
    for label, (width, height) in WIDTHS.items():
        page.set_viewport_size({"width": width, "height": height})
        if redraw:
            redraw()
        page.wait_for_timeout(300)  # let the layout and the charts settle
        page.screenshot(path=str(ARTIFACTS / f"app-{name}-{label}.png"), full_page=label != "1280")
    page.set_viewport_size({"width": 1280, "height": 800})


def test_upload_predict_and_switch_task(page):
    from playwright.sync_api import expect

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
    shoot(page, "predict")


def test_a_text_file_as_an_image_gives_one_message_and_no_path(page, tmp_path):
    from playwright.sync_api import expect

    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.locator("#image input[type=file]").set_input_files(str(bad))
    expect(page.locator("#timing")).to_contain_text("The uploaded file is not an image")
    expect(page.locator("#image img")).to_be_hidden()  # no broken-image icon
    body = page.locator("body").inner_text()
    assert body.count("is not an image") == 1 and "/tmp" not in body and "notes.png" not in body
    shoot(page, "bad-upload")


def test_all_tasks_says_what_to_do_then_shows_percentages(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="All tasks").click()
    headers = page.locator("#table-all thead th")
    expect(headers.first).to_contain_text("task")  # real headers on the empty table, not 1 2 3
    page.locator("#run-all").click()
    expect(page.locator("#all-note")).to_contain_text("Upload an image first")
    page.locator("#image-all input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "ship" / "0000.jpg"))
    expect(page.locator("#all-note")).to_contain_text(f"{len(TASKS)} of {len(TASKS)} task(s)")
    grid = page.locator("#table-all [role=grid]")
    for name in TASKS:
        expect(grid).to_contain_text(name)
    cells = re.findall(r"^\d+\.\d%$", grid.inner_text(), re.M)  # the probability cells (notes may hold % too)
    assert len(cells) == len(TASKS)  # percentages, as Predict shows them

    def rerun() -> None:
        page.locator("#run-all").click()
        expect(page.locator("#all-note")).to_contain_text(f"{len(TASKS)} of {len(TASKS)} task(s)")
        width = page.viewport_size["width"]
        for cell in page.locator("#table-all thead span.header, #table-all tbody span").all():
            assert cell.evaluate(NO_WORD_SPLIT), f"{cell.inner_text()!r} is broken mid-word at {width} px"

    shoot(page, "all-tasks", redraw=rerun)


def test_compare_fits_its_box_and_speaks_in_units(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#summary")).to_contain_text("smaller")
    expect(page.locator("canvas, svg.marks").first).to_be_visible()
    bold = page.locator("#summary strong").all_inner_texts()
    assert any(re.fullmatch(r"\d+\.\d [KMG]?B", b) for b in bold), bold  # "**741.1 KB**", not "**741.1 K**B"
    for width, height in WIDTHS.values():
        page.set_viewport_size({"width": width, "height": height})
        _refresh_compare(page)  # the table sizes its columns when its data arrive
        wrap = page.locator("#cost-table [role=grid]")
        inner, box = wrap.evaluate("w => [w.scrollWidth, w.clientWidth]")
        assert inner <= box + 2, f"at {width} px the cost table is {inner} px wide in a {box} px box"
        for label in page.locator("#cost-table thead span.header").all():
            assert label.evaluate(NO_WORD_SPLIT), f"{label.inner_text()!r} is broken mid-word at {width} px"
    shoot(page, "compare", redraw=lambda: _refresh_compare(page))


def test_training_shows_progress_and_disables_the_button(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Add a task").click()
    page.locator("#backbone input").fill("vit_pico_patch4_32")
    page.locator("#backbone input").press("Enter")
    page.locator("#pretrained input").uncheck()
    page.get_by_label("Task name").fill("digits-small")
    page.get_by_label("Epochs").fill("2")
    page.get_by_label("Batch size").fill("16")
    page.get_by_label("Image size in px (0: the backbone's own)").fill("48")  # pico's own is 32
    page.get_by_text("Quick run: fewer images").click()
    page.get_by_label("Training images (0: all)").fill("320")
    page.get_by_label("Validation and test images (0: all)").fill("64")
    page.locator("#train").click()
    expect(page.locator("#train")).to_be_disabled()
    progress = page.locator("#train-status .progress-text, #train-status .meta-text").first
    expect(progress).to_be_visible()
    seen = set()
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while time.monotonic() < deadline:  # the text changes as training goes on (epoch, loss, share done)
        text = page.locator("#train-status").inner_text()
        box = page.locator("#train-status").bounding_box()
        if "Trained" in text:
            break
        if "Epoch" in text or "Building" in text:
            assert box["height"] > 20 and box["width"] > 100
            seen.add(text.split("\n")[-1] if "Epoch" in text else text)
            if len(seen) == 2:
                shoot(page, "training")
        page.wait_for_timeout(250)
    assert len(seen) >= 2, f"progress text never changed: {seen}"
    expect(page.locator("#train-status")).to_contain_text("Trained digits-small version 1: adapter on "
                                                          "vit_pico_patch4_32@48px", timeout=TIMEOUT_MS)
    expect(page.locator("#train")).to_be_enabled()


def test_an_error_stays_until_dismissed(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Add a task").click()
    page.locator("#dataset input").fill("folder:/etc")
    page.locator("#dataset input").press("Enter")
    page.locator("#train").click()
    toast = page.get_by_text("outside the data roots")
    expect(toast).to_be_visible()
    assert "passwd" not in page.locator("body").inner_text()
    expect(page.locator("#train")).to_be_enabled()  # ready for the next try
    page.wait_for_timeout(11_000)  # Gradio's toasts go after 10 s; this one must stay
    expect(toast).to_be_visible()
    shoot(page, "error")
    page.get_by_test_id("toast-close").first.click()  # dismissed, it goes
    expect(toast).to_be_hidden()


def _refresh_compare(page) -> None:
    from playwright.sync_api import expect

    page.locator("#compare-refresh").click()
    expect(page.locator("#cost-table [data-testid=status-tracker]").first).to_have_class(re.compile(r"\bhide\b"))
    page.wait_for_timeout(500)  # the charts fade in


def test_auto_routes_and_all_tasks_marks_the_choice(page):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Predict").click()
    page.locator("#image input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "ship" / "0001.jpg"))
    page.locator("#task input").click()
    page.get_by_role("option", name="Auto: which task?").click()
    expect(page.locator("#timing")).to_contain_text("Routed to")
    expect(page.locator("#timing")).to_contain_text("% sure")
    assert page.locator("#labels [data-testid=label-output-value]").inner_text() in CLASSES
    expect(page.get_by_role("option", name="Auto: which task?")).to_be_hidden()  # the list closed
    page.screenshot(path=str(ARTIFACTS / "app-auto.png"), full_page=True)
    page.get_by_role("tab", name="All tasks").click()
    page.locator("#image-all input[type=file]").set_input_files(str(CIFAR_MINI / "test" / "ship" / "0001.jpg"))
    expect(page.locator("text=router's choice >> visible=true").first).to_be_visible()
    expect(page.locator("#table-all [data-testid=status-tracker]").first).to_have_class(re.compile(r"\bhide\b"))
    page.screenshot(path=str(ARTIFACTS / "app-all-tasks-routed.png"), full_page=True)


def _starts_with(prefix: str):
    return re.compile("^" + re.escape(prefix))
