"""Debian's Chromium, headless, driven by Playwright for the tests that need a
real browser. Playwright is told where the distribution's browser is and
downloads none; a machine without Chromium fails these tests, never skips them."""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@contextmanager
def chromium():
    """A browser context on a fresh profile, removed afterwards."""
    assert shutil.which(CHROMIUM), f"{CHROMIUM} is missing: apt-get install chromium (make test installs it)"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)
