"""Pages as users see them: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# The machine has no network: keep Chromium from calling out at start.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def _driver(width: int = 1400, height: int = 900):
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.fail("headless Chromium is needed: apt-get install chromium chromium-driver (infra/test.sh does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _load(driver, page: Path) -> None:
    driver.get(page.resolve().as_uri())
    driver.execute_script("document.querySelectorAll('img').forEach(i => i.loading = 'eager');")
    driver.execute_async_script(
        "const done = arguments[0];"
        "Promise.all([...document.images].map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; })))"
        ".then(() => done());")


def image_states(page: Path) -> list[dict]:
    """Load ``page`` in headless Chromium; each ``<img>`` with its source and whether it decoded."""
    return page_facts(page)["images"]


def page_facts(page: Path, width: int = 1400, screenshot: Path | None = None) -> dict:
    """Load ``page`` in headless Chromium in a window ``width`` px wide: its images (source, decoded),
    links (href, text, whether the target file exists), the page's scroll width, the widest cell's right
    edge, and its text."""
    driver = _driver(width)
    try:
        _load(driver, page)
        facts = driver.execute_script(
            "return {images: [...document.images].map(i => ({src: i.getAttribute('src'), "
            "ok: i.complete && i.naturalWidth > 0})),"
            "links: [...document.links].map(a => ({href: a.getAttribute('href'), text: a.textContent})),"
            "scroll_width: document.documentElement.scrollWidth, client_width: document.documentElement.clientWidth,"
            "right: Math.max(...[...document.querySelectorAll('td, th')].map(c => c.getBoundingClientRect().right)),"
            "text: document.body.innerText};")
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    for link in facts["links"]:
        link["exists"] = (page.parent / link["href"]).exists()
    return facts
