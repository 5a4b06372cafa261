"""Shared fixtures: small real-photo clips generated once per test session."""

import os
import shutil
import tempfile
from fractions import Fraction

# Tests never touch the network or the user's Hugging Face cache. Set before anything imports
# huggingface_hub, which reads these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="cinefx-test-hf-")
# The tiny models' tensors are too small to split between threads: one thread renders a tiny scene
# several times faster on CI's two cores (about 1 s against 20 s when the machine is busy). Set
# before torch is imported, here and in the CLI subprocesses the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from cinefx.testing.clips import Move, cut, write_clip

SIZE = (160, 90)


@pytest.fixture(autouse=True)
def _no_user_settings(monkeypatch, tmp_path_factory):
    """The user's own model, config file and presets never leak into a test."""
    monkeypatch.delenv("CINEFX_MODEL", raising=False)
    monkeypatch.delenv("CINEFX_CONFIG", raising=False)
    monkeypatch.delenv("CINEFX_PRESETS_DIR", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.getbasetemp() / "xdg-config"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """The tiny random-weight SD1.5-shaped bundle, written once through the public command."""
    from cinefx.testing.__main__ import main

    d = tmp_path_factory.mktemp("tiny") / "bundle"
    assert main(["tiny-models", str(d)]) == 0
    return d


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session: Debian's, driven through the system chromedriver
    (the Service names it, so Selenium Manager never runs and nothing is downloaded). Where the
    CI variable is set a missing browser fails the tests that use it; elsewhere they skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or shutil.which("/usr/bin/chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    missing = ("selenium is not installed" if webdriver is None else
               "chromium is not installed" if chromium is None else
               "chromedriver is not installed" if driver is None else None)
    if missing:
        why = (f"browser tests need Chromium, chromedriver and selenium: {missing} "
               "(apt-get install chromium chromium-driver)")
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    drv.set_page_load_timeout(20)
    try:
        yield drv
    finally:
        drv.quit()


def two_shots(n=24, size=SIZE):
    return cut(Move("astronaut", n, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
               Move("coffee", n, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)), size=size)


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    made = {}
    made["mp4"] = write_clip(d / "basic.mp4", two_shots(), fps=24, audio="aac")
    # first frame at 0.042 s, and uneven frame durations (variable frame rate)
    tb = Fraction(1, 12288)
    vfr_pts = [512]
    for i in range(1, 48):
        vfr_pts.append(vfr_pts[-1] + (512 if i % 3 else 1024))
    made["vfr"] = write_clip(d / "vfr.mp4", two_shots(), fps=24, time_base=tb, pts=vfr_pts, audio="aac")
    made["odd"] = write_clip(d / "odd.mp4", two_shots(12, (161, 91)), fps=24, pix_fmt="yuv444p", audio=None)
    made["10bit"] = write_clip(d / "tenbit.mp4", two_shots(12), fps=24, pix_fmt="yuv420p10le", audio=None)
    made["portrait"] = write_clip(d / "portrait.mp4", two_shots(12, (90, 160)), fps=30, rotation=90, audio="aac")
    made["avi_ac3"] = write_clip(d / "old.avi", two_shots(12), fps=25, codec="mpeg4", audio="ac3", tag_colour=False)
    made["mkv_opus"] = write_clip(d / "clip.mkv", two_shots(12), fps=24, audio="opus")
    made["mp4_mp3"] = write_clip(d / "mp3.mp4", two_shots(12), fps=24, audio="mp3")
    made["mov_pcm"] = write_clip(d / "pcm.mov", two_shots(12), fps=24, audio="pcm")
    return made
