"""`cinefx rate`: the blinded pairwise study, its server and its tally; answered in a real browser."""

import http.client
import json
import threading
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from cinefx.errors import InputFileError, MissingFileError, OptionError, OutputError
from cinefx.rate import StudyOptions, StudyServer, make_study, tally_study, wilson_interval
from cinefx.rate.page import ANSWERS_FORMAT
from cinefx.testing.clips import Move, render_move, write_clip

SYSTEMS = {"epic": lambda f: 255 - f, "noir": lambda f: f.mean(axis=2, keepdims=True).repeat(3, 2).astype(np.uint8),
           "base": lambda f: f}
SOURCES = ("harbour", "market", "tower")  # two clips and a still


def _remux_with_title(src: Path, title: str) -> None:
    """Tag a clip as cinefx tags its renders, so a test can see the tag does not reach the page."""
    tmp = src.with_name("tagged" + src.suffix)
    with av.open(str(src)) as i, av.open(str(tmp), "w") as o:
        o.metadata["title"] = o.metadata["comment"] = title
        s = o.add_stream_from_template(i.streams.video[0])
        for p in i.demux(i.streams.video[0]):
            if p.size:
                p.stream = s
                o.mux(p)
    tmp.replace(src)


def _make_renders(root: Path, systems) -> list[Path]:
    shots = {"harbour": list(render_move(Move("astronaut", 24), (192, 108))),
             "market": list(render_move(Move("coffee", 24, (0.4, 0.5, 1.0), (0.6, 0.5, 0.7)), (192, 108)))}
    still = next(render_move(Move("chelsea", 1), (240, 160)))
    folders = []
    for name in systems:
        d = root / f"renders-{name}"
        d.mkdir()
        look = SYSTEMS[name]
        for src, frames in shots.items():
            path = d / f"{src}.{name}.mp4"  # stylize's NAME.PRESET.mp4
            write_clip(path, [look(f) for f in frames], fps=24, audio=None)
            _remux_with_title(path, f"rendered by cinefx, preset {name}")
        cv2.imwrite(str(d / "tower.png"), cv2.cvtColor(look(still), cv2.COLOR_RGB2BGR))
        folders.append(d)
    return folders


@pytest.fixture(scope="module")
def renders3(tmp_path_factory):
    return _make_renders(tmp_path_factory.mktemp("renders3"), ("epic", "noir", "base"))


# -- statistics --------------------------------------------------------------------------------

def test_wilson_interval_matches_newcombe_and_scipy():
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of
    # seven methods", Statistics in Medicine 17:857-872, worked examples for the score method
    # without continuity correction (method 3), 4 decimals as published.
    for (k, n), published in {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605),
                              (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}.items():
        assert tuple(round(v, 4) for v in wilson_interval(k, n)) == published
    from scipy.stats import binomtest

    for n in (1, 2, 7, 36, 55, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
            assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


# -- making a study ----------------------------------------------------------------------------

def test_study_is_blinded_drawn_and_balanced(renders3, tmp_path):
    study = make_study(renders3, tmp_path / "study", StudyOptions(seed=7))
    key = json.loads(study.key.read_text())
    page = study.page.read_text()
    public = json.loads(page.split('<script type="application/json" id="study">')[1].split("</script>")[0])

    # every source meets every pair of systems once: 3 sources x 3 pairs
    drawn = [(t["source"], frozenset((t["a"], t["b"]))) for t in key["trials"].values()]
    systems = ("renders-epic", "renders-noir", "renders-base")
    assert Counter(drawn) == Counter((s, frozenset(p)) for s in SOURCES for p in combinations(systems, 2))
    assert [t["id"] for t in public["trials"]] == list(key["trials"])
    # sides balanced: the earlier system of each pair is on the left in 4 or 5 of the 9 trials
    left_first = sum(systems.index(t["a"]) < systems.index(t["b"]) for t in key["trials"].values())
    assert left_first in (4, 5)

    # the page and every file it loads name no system and no source; the key is not referenced
    media = [study.folder / m for t in public["trials"] for m in (t["a"], t["b"])]
    assert {m.parent.name for m in media} == {"media"} and len(set(media)) == 9  # one per source and system
    for blob in [page.encode()] + [m.read_bytes() for m in media]:
        for word in ("epic", "noir", "base", "renders", *SOURCES, "key.json", "cinefx, preset"):
            assert word.encode() not in blob, word
    # clips are VP9 WebM a browser plays, at most 640x360, of the same length; stills are JPEG
    for t in public["trials"]:
        for m in (t["a"], t["b"]):
            if t["kind"] == "video":
                with av.open(str(study.folder / m)) as c:
                    s = c.streams.video[0]
                    assert c.format.name.startswith("matroska,webm") and s.codec_context.name == "vp9"
                    assert (s.width, s.height) == (192, 108)
                    assert sum(1 for _ in c.decode(s)) == 24
            else:
                assert (study.folder / m).read_bytes()[:3] == b"\xff\xd8\xff"
    # the same seed draws the same study; another seed another one
    again = json.loads(make_study(renders3, tmp_path / "again", StudyOptions(seed=7)).key.read_text())
    other = json.loads(make_study(renders3, tmp_path / "other", StudyOptions(seed=8, trials=4)).key.read_text())
    assert list(again["trials"].values()) == list(key["trials"].values())
    assert len(other["trials"]) == 4 and list(other["trials"].values()) != list(key["trials"].values())[:4]
    assert again["study"] != key["study"]


def test_study_refuses_bad_inputs_and_leaves_nothing(renders3, tmp_path):
    epic, noir, _ = renders3
    with pytest.raises(OptionError, match="at least two"):
        make_study([epic], tmp_path / "s")
    with pytest.raises(MissingFileError, match="nope"):
        make_study([epic, tmp_path / "nope"], tmp_path / "s")
    (tmp_path / "empty").mkdir()
    with pytest.raises(OptionError, match="no source has a render in every system"):
        make_study([epic, tmp_path / "empty"], tmp_path / "s")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("")
    with pytest.raises(OutputError, match="not an empty folder"):
        make_study([epic, noir], tmp_path / "busy")
    with pytest.raises(OptionError, match="--questions"):
        StudyOptions(questions="likert")
    # a render that cannot be decoded: one error naming it, and no study or temporary left behind
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in epic.iterdir():
        (broken / f.name).write_bytes(f.read_bytes() if f.suffix == ".png" else b"\x00" * 4096)
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InputFileError, match="broken"):
        make_study([epic, broken], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not any(out.iterdir())
    (noir / "harbour.copy.mp4").write_bytes((noir / "harbour.noir.mp4").read_bytes())
    try:
        with pytest.raises(OptionError, match="both renders of 'harbour'"):
            make_study([epic, noir], tmp_path / "s")
    finally:
        (noir / "harbour.copy.mp4").unlink()


# -- tally -------------------------------------------------------------------------------------

def _answers(study, rater, answers, seq=None):
    return {"format": ANSWERS_FORMAT, "study": study, "rater": rater,
            "seq": len(answers) if seq is None else seq, "answers": answers}


def _expected(key, given):
    """Counts per (question, first system, second system) from answers given as the page records
    them (A = left, B = right), through the key: [first, second, neither]."""
    names = [s["name"] for s in key["systems"]]
    out = Counter()
    for trial, qa in given:
        for q, a in qa.items():
            t = key["trials"][trial]
            first, second = sorted((t["a"], t["b"]), key=names.index)
            chosen = {"A": t["a"], "B": t["b"]}.get(a)
            out[q, first, second, "neither" if chosen is None else "first" if chosen == first else "second"] += 1
    return out


def test_tally_combines_raters_without_double_counting(renders3, tmp_path):
    study = make_study(renders3[:2], tmp_path / "study")
    key = json.loads(study.key.read_text())
    trials = list(key["trials"])
    ann = {trials[0]: {"cinematic": "A"}, trials[1]: {"cinematic": "B"}, trials[2]: {"cinematic": "A"}}
    bob = {trials[0]: {"cinematic": "N"}, trials[1]: {"cinematic": "B"}, trials[2]: {"cinematic": "B"}}
    (study.folder / "answers").mkdir()
    (study.folder / "answers" / "ann-1.json").write_text(json.dumps(_answers(key["study"], "ann-1", ann)))
    # Ann's download of the same answers, and Bob's, given on the command line
    (tmp_path / "ann-download.json").write_text(json.dumps(_answers(key["study"], "ann-1", ann)))
    (tmp_path / "bob.json").write_text(json.dumps(_answers(key["study"], "bob-2", bob)))
    t = tally_study(study.folder, [tmp_path / "ann-download.json", tmp_path / "bob.json"])
    exp = _expected(key, [*ann.items(), *bob.items()])
    (pair,) = t.questions[0].pairs
    assert pair.systems == ("renders-epic", "renders-noir") and t.raters == ("ann-1", "bob-2")
    got = dict(zip(("first", "second", "neither"), (pair.first, pair.second, pair.neither)))
    assert got == {k: exp["cinematic", *pair.systems, k] for k in got} and pair.answers == 6
    assert pair.percent == pytest.approx(tuple(100 * got[k] / 6 for k in ("first", "second", "neither")))
    decided = got["first"] + got["second"]
    assert pair.win_rate == pytest.approx(got["first"] / decided)
    assert pair.win_interval == pytest.approx(wilson_interval(got["first"], decided))
    js = t.write_json(tmp_path / "tally.json")
    assert json.loads(js.read_text())["questions"][0]["pairs"][0]["counts"] == got

    # answers to another study, or with an answer the page cannot give, are refused by name
    (tmp_path / "other.json").write_text(json.dumps(_answers("0" * 16, "eve", ann)))
    with pytest.raises(InputFileError, match="other.json: answers to another study"):
        tally_study(study.folder, [tmp_path / "other.json"])
    (tmp_path / "odd.json").write_text(json.dumps(_answers(key["study"], "eve", {trials[0]: {"cinematic": "C"}})))
    with pytest.raises(InputFileError, match="odd.json: trial t1: 'cinematic': 'C' is not an answer"):
        tally_study(study.folder, [tmp_path / "odd.json"])
    with pytest.raises(OptionError, match="no answers found"):
        tally_study(make_study(renders3[:2], tmp_path / "fresh").folder)


# -- the server --------------------------------------------------------------------------------

@pytest.fixture
def served(renders3, tmp_path):
    study = make_study(renders3[:2], tmp_path / "study")
    server = StudyServer(study.folder, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield study, server
    server.shutdown()
    server.server_close()


def _request(server, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    return r.status, dict(r.getheaders()), r.read()


def test_server_serves_the_page_only_and_saves_answers_whole(served):
    study, server = served
    assert server.server_address[0] == "127.0.0.1"
    key = json.loads(study.key.read_text())
    status, headers, body = _request(server, "GET", "/")
    assert status == 200 and body == study.page.read_bytes()
    for secret in ("/key.json", "/answers/", "/../key.json", "/media/../key.json", "/tally.json"):
        assert _request(server, "GET", secret)[0] == 404, secret
    assert _request(server, "GET", "/", headers={"Host": "evil.example:80"})[0] == 403
    # media in byte ranges, as players seek and loop
    media = sorted((study.folder / "media").glob("*.webm"))[0]
    data = media.read_bytes()
    status, headers, body = _request(server, "GET", f"/media/{media.name}", headers={"Range": "bytes=100-199"})
    assert status == 206 and body == data[100:200] and headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert _request(server, "GET", f"/media/{media.name}", headers={"Range": "bytes=-50"})[2] == data[-50:]

    trials = list(key["trials"])
    post = lambda obj, ctype="application/json": _request(  # noqa: E731
        server, "POST", "/answers", json.dumps(obj).encode(), {"Content-Type": ctype})
    first = _answers(key["study"], "ann-1", {trials[0]: {"cinematic": "A"}})
    second = _answers(key["study"], "ann-1", {trials[0]: {"cinematic": "A"}, trials[1]: {"cinematic": "N"}})
    assert post(first, "text/plain")[0] == 415  # what a form on another site could send
    assert post(_answers(key["study"], "ann/../x", {}))[0] == 400
    assert post(_answers("f" * 16, "ann-1", {}))[0] == 400
    assert post(second)[0] == 200
    assert post(first)[0] == 200  # an older post arriving late does not undo the newer one
    saved = study.folder / "answers" / "ann-1.json"
    assert json.loads(saved.read_text()) == second
    assert [p.name for p in saved.parent.iterdir()] == ["ann-1.json"]  # no temporaries left


# -- in a real browser -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser_study(renders3, tmp_path_factory):
    return make_study(renders3[:2], tmp_path_factory.mktemp("bstudy") / "study", StudyOptions(questions="dreamshot"))


def _severe(browser):
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def _wait(cond, what, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if v := cond():
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _playing(browser):
    """Both clips of the pair on screen play: data decoded, no media error, time advancing, in step."""
    state = "return ['va','vb'].map(i => {const v = document.getElementById(i); " \
            "return [v.readyState, v.currentTime, v.error && v.error.code, v.paused];})"

    def until(ok, what):
        return _wait(lambda: (lambda s: s if ok(s) else None)(browser.execute_script(state)), what)

    first = until(lambda s: all(r[0] >= 2 and r[1] > 0 for r in s), "both clips to start playing")
    later = until(lambda s: all(b[1] > a[1] + 0.1 for a, b in zip(first, s)), "both clips' time to advance")
    assert all(r[2] is None and not r[3] for r in later)
    assert abs(later[0][1] - later[1][1]) < 0.3  # side by side, in sync


def test_browser_study_answered_by_clicks_and_keys_tallies_what_was_clicked(browser, browser_study, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    study = browser_study
    key = json.loads(study.key.read_text())
    server = StudyServer(study.folder, 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
        browser.get_log("browser")
        browser.get(server.url)
        assert "renders" not in browser.page_source
        browser.find_element(By.ID, "name").send_keys("Ann Lee", Keys.ENTER)
        body = browser.find_element(By.TAG_NAME, "body")
        click = lambda q, a: browser.find_element(  # noqa: E731
            By.CSS_SELECTOR, f'#questions button[data-question="{q}"][data-answer="{a}"]').click()
        press = {"A": ("a", Keys.ARROW_LEFT), "B": ("b", Keys.ARROW_RIGHT), "N": ("n", Keys.ARROW_DOWN)}
        given, step = {}, 0
        for n, trial in enumerate(key["trials"], 1):
            assert browser.find_element(By.ID, "count").text == f"Pair {n} of {len(key['trials'])}"
            kind = browser.execute_script("return S.trials[st.trial].kind")
            if kind == "video":
                _playing(browser)
            else:
                assert browser.execute_script(
                    "return ['ia', 'ib'].every(i => document.getElementById(i).naturalWidth > 0)")
            for q in ("shot", "quality", "prompt"):
                answer = "ABN"[(step * 2 + n) % 3]
                if step % 3 == 0:
                    click(q, answer)
                else:
                    body.send_keys(press[answer][step % 2])
                given.setdefault(trial, {})[q] = answer
                step += 1
        # on the last pair, go back to its first question and change the answer there
        assert browser.find_element(By.ID, "summary").is_displayed()
        for _ in range(3):
            body.send_keys(Keys.BACKSPACE)
        last = list(key["trials"])[-1]
        changed = "B" if given[last]["shot"] != "B" else "N"
        body.send_keys(press[changed][0])  # every question of the pair answered: on to the end again
        body.send_keys("a")  # the end page takes no answers
        given[last]["shot"] = changed
        assert browser.find_element(By.ID, "summary").text == f"You gave {3 * len(key['trials'])} answers on " \
                                                             f"{len(key['trials'])} pairs."
        browser.find_element(By.ID, "download").click()
        downloaded = _wait(lambda: [p for p in tmp_path.glob("answers-*.json")], "the download")[0]
        _wait(lambda: (study.folder / "answers").is_dir() and
              json.loads(next((study.folder / "answers").glob("*.json")).read_text())["seq"] == step + 1,
              "the server to hold every answer")
        assert not _severe(browser)
    finally:
        server.shutdown()
        server.server_close()

    exp = _expected(key, given.items())
    for files in ((), (downloaded,)):  # the server's copy, and with the rater's download (same rater)
        t = tally_study(study.folder, files)
        assert len(t.raters) == 1 and t.raters[0].startswith("Ann-Lee-")
        for q in t.questions:
            (p,) = q.pairs
            assert (p.first, p.second, p.neither) == tuple(exp[q.id, *p.systems, k]
                                                           for k in ("first", "second", "neither")), q.id
    assert json.loads(downloaded.read_text())["answers"] == given


def test_browser_study_plays_from_the_file_alone(browser, browser_study):
    """Opened as a file, without the server: the WebM plays and the keys work."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get_log("browser")
    browser.get(browser_study.page.resolve().as_uri())
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
    while browser.execute_script("return S.trials[st.trial].kind") != "video":
        browser.find_element(By.TAG_NAME, "body").send_keys("n", "n", "n")
    _playing(browser)
    assert "download your answers" in browser.find_element(By.ID, "status").text
    assert not _severe(browser)
