"""What the browser tests share: Debian's chromium (Playwright cannot download its own
here), how it is launched, and where screenshots go."""

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed (.ci/run installs it)"
)


def launch_chromium(playwright):
    """Headless Chromium with a fresh profile, quiet (no first-run, sync or update traffic)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    )
