"""`stylize --html`: the self-contained report page, its scene thumbnails and the batch index."""

import base64
import re
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest

from cinefx.htmlreport import IndexItem, SceneThumbs, write_html_index, write_html_report
from cinefx.metrics import TemporalMeter
from cinefx.report import build_report
from cinefx.scenes import Scene
from cinefx.testing.clips import Move, cut


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text):
    p = _Tags()
    p.feed(text)
    return p.tags


def _jpeg_level(data: bytes) -> float:
    return float(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE).mean())


def test_scene_thumbs_show_each_scene_near_its_middle():
    """Scenes of 1, 6, 40 and 300 frames; frame k of a scene is grey level 10 + k * step, so a
    thumbnail's level says which frame it shows."""
    lengths = (1, 6, 40, 300)
    thumbs = SceneThumbs(width=64, keep=16)
    for scene, n in enumerate(lengths):
        step = 200 / max(1, n - 1)
        for k in range(n):
            src = np.full((90, 160, 3), round(10 + k * step), np.uint8)
            thumbs.add(scene, src, 255 - src)
    got = thumbs.finish()
    assert sorted(got) == list(range(len(lengths)))
    for scene, n in enumerate(lengths):
        t, mid, step = got[scene], (n - 1) / 2, 200 / max(1, n - 1)
        # within half the final sample spacing of the middle (spacing: n / keep frames at most)
        assert abs(t.offset - mid) <= max(0.5, n / 16), (n, t.offset)
        assert _jpeg_level(t.input) == pytest.approx(10 + t.offset * step, abs=2)
        assert _jpeg_level(t.output) == pytest.approx(255 - (10 + t.offset * step), abs=2)
        assert cv2.imdecode(np.frombuffer(t.input, np.uint8), cv2.IMREAD_COLOR).shape == (36, 64, 3)


@pytest.fixture(scope="module")
def rendered():
    """A real report of a two-shot clip (a cut at frame 24) 'rendered' by a tone curve, with the
    thumbnails the orchestrator would collect beside the meter."""
    frames = list(cut(Move("astronaut", 24, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
                      Move("coffee", 24, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)), size=(160, 90)))
    curve = (255 * (np.arange(256) / 255) ** 0.8).astype(np.uint8)
    scenes = [Scene(0, 0, 24, "start"), Scene(1, 24, 48, "cut")]
    meter, thumbs = TemporalMeter(64), SceneThumbs()
    for sc in scenes:
        for f in frames[sc.start:sc.end]:
            out = curve[f]
            meter.add(sc.index, f, out)
            thumbs.add(sc.index, f, out)
    meter.finish()
    times = [i / 24 for i in range(48)]
    report = build_report(meter, scenes, times, 2.0, "in <b>1</b>.mp4", "out <script>alert(1)</script>.mp4",
                          "grade", "epic & noir", grain=0.1)
    return report, thumbs.finish()


def test_html_report_is_one_self_contained_file(rendered, tmp_path):
    report, thumbs = rendered
    page = write_html_report(report, thumbs, tmp_path / "report.html")
    text = page.read_text()
    tags = _tags(text)
    assert not [t for t in tags if t[0] == "script"]  # the file names are shown, not run
    assert "out &lt;script&gt;alert(1)&lt;/script&gt;.mp4" in text and "epic &amp; noir" in text
    # every image is inside the page and decodes; nothing is loaded from anywhere else
    imgs = [a["src"] for t, a in tags if t == "img"]
    assert len(imgs) == 2 * len(report.scenes) + 1  # in and out per scene, and the plot
    for src in imgs:
        mime, data = re.fullmatch(r"data:(image/(?:jpeg|png));base64,(.+)", src).groups()
        assert cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR) is not None
    assert not [a for t, a in tags for k, v in a.items() if k in ("src", "href") and v and
                not v.startswith("data:")]
    # a row per scene with its figures, as in the JSON report
    rows = [a for t, a in tags if t == "tr" and a.get("class") == "scene"]
    assert [r["data-scene"] for r in rows] == ["1", "2"]
    assert f"{report.scenes[1].input.psnr:.2f}" in text and f"{report.scenes[1].delta_tssim:+.3f}" in text
    assert "film grain (strength 0.1)" in text
    # a scene without thumbnails is still listed, and says so
    write_html_report(report, {0: thumbs[0]}, tmp_path / "partial.html", plot=False)
    partial = (tmp_path / "partial.html").read_text()
    assert partial.count('class="scene"') == 2 and "no thumbnail" in partial and "image/png" not in partial


def test_html_index_links_pages_relatively_and_says_why_one_is_missing(rendered, tmp_path):
    report, thumbs = rendered
    (tmp_path / "pages").mkdir()
    page = write_html_report(report, thumbs, tmp_path / "pages" / "a b.html", plot=False)
    index = write_html_index([IndexItem("footage/a b.mp4", page, report, thumbs[0]),
                              IndexItem("footage/<bad>.mp4", status="failed: cannot be decoded")],
                             tmp_path / "index.html")
    tags = _tags(index.read_text())
    assert [a["href"] for t, a in tags if t == "a"] == ["pages/a b.html"]
    assert "&lt;bad&gt;.mp4" in index.read_text() and "failed: cannot be decoded" in index.read_text()
    delta = report.overall_output.psnr - report.overall_input.psnr
    assert f"{delta:+.2f}" in index.read_text()


def test_html_report_in_browser_shows_every_scene_without_errors(browser, rendered, tmp_path):
    from selenium.webdriver.common.by import By

    report, thumbs = rendered
    (tmp_path / "pages").mkdir()
    page = write_html_report(report, thumbs, tmp_path / "pages" / "clip.html")
    index = write_html_index([IndexItem("clip.mp4", page, report, thumbs[0])], tmp_path / "index.html")
    browser.get_log("browser")
    browser.get(index.resolve().as_uri())
    browser.find_element(By.LINK_TEXT, "clip.mp4").click()
    assert browser.current_url == page.resolve().as_uri()
    shown = browser.execute_script("""
        return Array.from(document.querySelectorAll('tr.scene')).map(r => [
            r.dataset.scene, r.getBoundingClientRect().height > 0,
            Array.from(r.querySelectorAll('img')).map(i => i.complete && i.naturalWidth > 0)]);""")
    assert shown == [[str(s.index + 1), True, [True, True]] for s in report.scenes]
    assert browser.execute_script("return document.querySelector('img.plot').naturalWidth") > 0
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
