"""The web demo end to end: `lseg demo` on a free loopback port, driven by headless Chromium (Debian's
`chromium`, launched by Playwright with `executable_path`: no browser download) and by 8 concurrent
`gradio_client` clients. Skipped with the reason when gradio, Playwright or Chromium are missing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_data_dir
from tests.hostile import good_image

pytest.importorskip("gradio", reason="the demo needs the demo extra (gradio)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(
    os.environ.get("LSEG_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".ci" / "artifacts")
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(url, server log path) of a running `lseg demo` with a tiny random model."""
    import torch

    from lseg import LSeg

    folder = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    model_dir = LSeg.from_config("tiny", pretrained=False).save_pretrained(folder / "model")
    port = free_port()
    log = folder / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "lseg.cli.main", "demo", "--checkpoint", str(model_dir)]
    with open(log, "wb") as output:
        server = subprocess.Popen(
            [*command, "--port", str(port), "--device", "cpu"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    try:
        while True:
            if server.poll() is not None:
                pytest.fail(f"lseg demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lseg demo did not answer within 90 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture
def photo(tmp_path) -> Path:
    shared = shared_data_dir() / "images" / "cat1.jpeg"
    return shared if shared.is_file() else good_image(tmp_path / "generated.png", size=(96, 128))


@pytest.fixture(scope="module")
def page(demo):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium); .ci/run installs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(demo[0])
        page.get_by_role("button", name="Segment").wait_for(timeout=30_000)
        yield page
        browser.close()


def segment_in_page(page, image: Path | None, labels: str) -> None:
    if image is not None:
        page.locator("input[type=file]").first.set_input_files(str(image))
    page.get_by_label("labels (comma-separated)").fill(labels)
    page.get_by_role("button", name="Segment").click()


def shares_in_page(page) -> dict[str, str]:
    """The label-shares table as {label: share}."""
    cells = page.locator("#shares").inner_text().split("\n")
    words = [c.strip() for c in cells if c.strip() and c.strip() not in ("label", "share", "label shares")]
    return dict(zip(words[::2], words[1::2]))


def test_upload_type_labels_and_see_every_output(page, photo):
    labels = ["cat", "grass", "other"]
    segment_in_page(page, photo, ", ".join(labels))
    page.locator("#timing").get_by_text(" s on cpu").wait_for(timeout=60_000)
    assert set(shares_in_page(page)) == set(labels)
    assert page.locator("#segmentation img").count() == 1
    assert page.locator("#heatmaps img").count() == len(labels)
    for label in labels:
        assert page.locator("#heatmaps").get_by_text(label, exact=True).count() == 1
    assert ".png" in page.locator("#label-map").inner_text()
    assert "0 = cat, 1 = grass, 2 = other" in page.locator("#timing").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)


@pytest.mark.parametrize(
    ("labels", "upload", "message"),
    [
        ("", "image", "type some labels"),
        ("cat, Cat", "image", "duplicate labels: cat / Cat"),
        (", ".join(f"w{i}" for i in range(65)), "image", "at most 64 labels"),
        ("cat, dog", "text", "cannot identify image file"),
    ],
)
def test_bad_inputs_are_messages_in_the_page_and_the_server_keeps_serving(
    page, photo, tmp_path, labels, upload, message
):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    segment_in_page(page, photo if upload == "image" else bad, labels)
    page.get_by_text(message).first.wait_for(timeout=30_000)
    page.reload()
    page.get_by_role("button", name="Segment").wait_for(timeout=30_000)
    segment_in_page(page, photo, "sky, ground")
    page.locator("#timing").get_by_text("0 = sky, 1 = ground").wait_for(timeout=60_000)


def test_label_text_is_shown_literally_and_injects_no_element(page, photo):
    """Labels are user text: the page must show them as typed, never as HTML or Markdown."""
    alerts = []
    page.on("dialog", lambda dialog: (alerts.append(dialog.message), dialog.dismiss()))
    page.reload()
    labels = ["<img src=x onerror=alert(1)>", "<b>bold</b>", "[a link](https://example.com)"]
    legend = ", ".join(f"{index} = {label}" for index, label in enumerate(labels))
    segment_in_page(page, photo, ", ".join(labels))
    page.locator("#timing").get_by_text("label map values").wait_for(timeout=60_000)  # empty after reload
    assert legend in page.locator("#timing").inner_text()
    assert set(shares_in_page(page)) == set(labels)
    for label in labels:
        assert page.locator("#heatmaps").get_by_text(label, exact=True).count() == 1
    segment_in_page(page, None, "<b>bold</b>, <B>BOLD</B>")  # the error message quotes the labels
    page.get_by_text("duplicate labels: <b>bold</b> / <B>BOLD</B>").first.wait_for(timeout=30_000)
    assert page.locator("img[src='x'], b, a[href='https://example.com']").count() == 0
    assert alerts == []


def test_eight_concurrent_clients_get_their_own_answers_from_one_model(demo, tmp_path):
    from gradio_client import Client, handle_file

    url, log = demo
    image = good_image(tmp_path / "street.png", size=(64, 80), seed=5)

    def ask(index: int) -> tuple[list[str], list[str], np.ndarray]:
        labels = [f"word{index}", "road", f"thing{index}"][: 2 + index % 2]
        client = Client(url, verbose=False)
        _, table, gallery, label_map, _ = client.predict(
            handle_file(str(image)), ", ".join(labels), 64, "single", index % 2 == 0, api_name="/segment"
        )
        return labels, [row[0] for row in table["data"]], np.asarray(Image.open(label_map))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    for labels, table_labels, label_map in answers:
        assert sorted(table_labels) == sorted(labels)
        assert label_map.shape == (64, 80) and int(label_map.max()) < len(labels)
    assert log.read_text().count("lseg demo: model") == 1  # loaded once, shared by every request
