"""The Gradio demo in a real browser: Debian's Chromium, headless, driven by Selenium, against the app on
Ray Serve (127.0.0.1). Pick an example, ask, see an answer, a refusal badge and the confidence; the
screenshot is saved under the test's tmp dir (its path is printed) for a human to look at.

The browser is tests/conftest.py's `browser` fixture (offline Selenium, Debian's Chromium).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

WAIT_S = 90


@pytest.fixture(scope="module")
def base_url(ray_local, tiny_checkpoint: Path, free_port) -> Iterator[str]:
    from ray import serve

    from serve.app import APP_NAME, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
        serve.run(
            build_app({"checkpoint": str(tiny_checkpoint), "config": str(config)}),
            route_prefix="/",
            name=APP_NAME,
        )
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_ask_a_question_in_the_demo(base_url: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_S)
    browser.get(f"{base_url}/demo/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))

    # The first example row is an answerable ShapesWorld question: clicking it fills image and question.
    rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "table tbody tr"))
    assert len(rows) >= 4
    rows[0].click()
    question = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    wait.until(lambda d: question.get_attribute("value"))
    # The picked image must load (under a mount path its URL once missed the /demo prefix: a 404).
    wait.until(
        lambda d: any(
            int(img.get_attribute("naturalWidth") or 0) > 0
            for img in d.find_elements(By.CSS_SELECTOR, "#demo-image img")
        )
    )

    browser.find_element(By.CSS_SELECTOR, "#ask").click()
    answer = browser.find_element(By.CSS_SELECTOR, "#answer textarea")
    wait.until(lambda d: answer.get_attribute("value"))
    wait.until(lambda d: "NO ANSWER YET" not in d.find_element(By.CSS_SELECTOR, "#badge").text)

    badge = browser.find_element(By.CSS_SELECTOR, "#badge").text
    confidence = browser.find_element(By.CSS_SELECTOR, "#confidence").text
    latency = browser.find_element(By.CSS_SELECTOR, "#latency textarea").get_attribute("value")
    assert badge.startswith(("ANSWERED", "REFUSED"))
    assert "confidence" in confidence and "sampled answers agree" in confidence
    assert latency.endswith(" ms")

    shot = tmp_path / "gradio_demo.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
    print(
        f"\ndemo screenshot: {shot}\nquestion: {question.get_attribute('value')!r} -> answer "
        f"{answer.get_attribute('value')!r}, badge {badge!r}, {latency}"
    )
