"""Drive the OHIF viewer bundled with MONAI Label (``/ohif/``) in Debian's headless Chromium, as an annotator does.

Used by the browser test and by ``bench/ohif.py``. Needs ``playwright`` (the Python package only: the browser is
``/usr/bin/chromium`` from Debian, never one that Playwright downloads).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-quic", "--disable-sync"]


def coloured_pixels(png: bytes, boxes: Sequence[Mapping[str, Any]]) -> int:
    """Clearly coloured pixels (max - min channel > 80) inside ``boxes`` (x, y, width, height) of a screenshot.

    Grey-scale images leave this near 0; a segmentation overlay adds its area.
    """
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    colour = (rgb.max(-1) - rgb.min(-1)) > 80
    total = 0
    for b in boxes:  # inset by 4 px: the active viewport's border is coloured
        x0, y0 = int(b["x"]) + 4, int(b["y"]) + 4
        total += int(colour[y0 : int(b["y"] + b["height"]) - 4, x0 : int(b["x"] + b["width"]) - 4].sum())
    return total


@dataclass
class OhifRun:
    """What one auto-segmentation from the OHIF panel did."""

    infer_url: str
    infer_status: int
    seconds_to_overlay: float  # from the click on Run to the overlay drawn
    overlay_before: int  # coloured pixels in the viewports before / after
    overlay_after: int
    screenshots: dict[str, Path] = field(default_factory=dict)


def run_model_in_ohif(server: str, study_uid: str, model: str, out_dir: str | Path, timeout: float = 120.0,
                      viewport: tuple[int, int] = (1600, 1000)) -> OhifRun:
    """Open ``study_uid`` in ``<server>/ohif/monai-label``, type ``server`` into the MONAI Label panel, connect,
    choose ``model``, press Run, and wait until the overlay is drawn. Screenshots go to ``out_dir``.

    Raises:
        FileNotFoundError: Debian's chromium is absent. TimeoutError: no infer request or no overlay in time.
    """
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is not installed: run `make install-system` (Debian chromium)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calls: list[tuple[str, int]] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
            page.on("response", lambda r: calls.append((r.url, r.status)) if "/infer/" in r.url else None)
            page.goto(f"{server.rstrip('/')}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
            page.wait_for_selector("#monailabelServerURL", timeout=timeout * 1000)
            page.wait_for_function("document.querySelectorAll('canvas').length >= 3", timeout=timeout * 1000)
            page.wait_for_timeout(5000)  # first images rendered
            if page.get_by_text("Confirm and Hide").count():
                page.get_by_text("Confirm and Hide").click()
            url_box = page.locator("#monailabelServerURL")
            url_box.fill(server.rstrip("/") + "/")
            url_box.locator("xpath=../../td/button").click()
            page.wait_for_selector(f"select option[value='{model}']", state="attached", timeout=30_000)
            page.locator("select").filter(has=page.locator(f"option[value='{model}']")).first.select_option(model)
            canvases = page.locator("canvas")
            boxes = [b for i in range(canvases.count()) if (b := canvases.nth(i).bounding_box()) and b["width"] > 200]
            shots = {"before": out / "ohif_before.png", "segmentation": out / "ohif_segmentation.png"}
            before_png = page.screenshot(path=str(shots["before"]))
            before = coloured_pixels(before_png, boxes)
            start = time.monotonic()
            page.get_by_role("button", name="Run").first.click()
            after, seconds = before, float("nan")
            while time.monotonic() - start < timeout:
                page.wait_for_timeout(250)
                if calls and (after := coloured_pixels(page.screenshot(), boxes)) > before + 3000:
                    seconds = time.monotonic() - start
                    break
            page.wait_for_timeout(1000)
            page.screenshot(path=str(shots["segmentation"]))
        finally:
            browser.close()
    if not calls:
        raise TimeoutError(f"OHIF sent no infer request within {timeout:.0f} s")
    return OhifRun(calls[0][0], calls[0][1], seconds, before, after, shots)
