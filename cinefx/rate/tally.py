"""Tallies of a preference study: per question and pair of systems, the shares of answers for
each system and for "neither / same" (the three percentages DreamShot reports), and the first
system's win rate over the answers that chose one, with Wilson's 95 % score interval.

Any number of raters' answer files combine; a rater's answer to a trial and question counts once
(the last one read wins, so the server's copy and the rater's download of the same answers do not
count twice).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from statistics import NormalDist

from cinefx.errors import InputFileError, MissingFileError, OptionError
from cinefx.fsutil import write_text
from cinefx.rate.page import ANSWERS_FORMAT
from cinefx.rate.study import ANSWERS, load_key

RATER = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_ANSWERS_FILE = 4 << 20  # a rater's file is a few kB; anything near this is not one


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (Wilson 1927; method 3 of Newcombe 1998,
    without continuity correction): the proportions a two-sided score test at `confidence` does
    not reject. n must be positive."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class PairTally:
    systems: tuple[str, str]
    first: int  # answers preferring systems[0]
    second: int  # answers preferring systems[1]
    neither: int  # "neither / same"

    @property
    def answers(self) -> int:
        return self.first + self.second + self.neither

    @property
    def percent(self) -> tuple[float, float, float] | None:
        """(first, second, neither) as percentages of all answers."""
        n = self.answers
        return (100 * self.first / n, 100 * self.second / n, 100 * self.neither / n) if n else None

    @property
    def win_rate(self) -> float | None:
        """systems[0]'s share of the answers that chose a system (ties left out)."""
        decided = self.first + self.second
        return self.first / decided if decided else None

    @property
    def win_interval(self) -> tuple[float, float] | None:
        decided = self.first + self.second
        return wilson_interval(self.first, decided) if decided else None

    def to_json(self) -> dict:
        pct = self.percent
        return {"systems": list(self.systems), "answers": self.answers,
                "counts": {"first": self.first, "second": self.second, "neither": self.neither},
                "percent": dict(zip(("first", "second", "neither"), pct)) if pct else None,
                "win_rate": {"wins": self.first, "decided": self.first + self.second, "rate": self.win_rate,
                             "ci95": list(self.win_interval) if self.win_interval else None}}


@dataclass(frozen=True)
class QuestionTally:
    id: str
    text: str
    pairs: tuple[PairTally, ...]


@dataclass(frozen=True)
class Tally:
    study: str
    systems: tuple[str, ...]
    raters: tuple[str, ...]
    files: tuple[str, ...]
    questions: tuple[QuestionTally, ...]

    @property
    def answers(self) -> int:
        return sum(p.answers for q in self.questions for p in q.pairs)

    def to_json(self) -> dict:
        return {"study": self.study, "systems": list(self.systems), "raters": list(self.raters),
                "files": list(self.files), "answers": self.answers,
                "questions": [{"id": q.id, "text": q.text, "pairs": [p.to_json() for p in q.pairs]}
                              for q in self.questions],
                "notes": ("per question and pair of systems: counts and percentages of answers for the "
                          "first system, the second and neither/same; win_rate: the first system's share of "
                          "the answers that chose one, with Wilson's 95 % score interval")}

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_text(path, json.dumps(self.to_json(), indent=2, allow_nan=False))


def check_answers(key: dict, data, where: str) -> dict:
    """`data`, one rater's answers as the page writes them, checked against the study's `key`.
    Raises InputFileError naming `where` (a file, or the server's request)."""
    if not isinstance(data, dict) or data.get("format") != ANSWERS_FORMAT:
        raise InputFileError(f"{where}: not a cinefx rating answers file (format {ANSWERS_FORMAT!r} expected)")
    if data.get("study") != key["study"]:
        raise InputFileError(f"{where}: answers to another study ({str(data.get('study'))[:20]!r}, "
                             f"this one is {key['study']!r})")
    rater, answers, seq = data.get("rater"), data.get("answers"), data.get("seq")
    if not isinstance(rater, str) or not RATER.fullmatch(rater):
        raise InputFileError(f"{where}: rater {str(rater)[:70]!r} is not 1-64 letters, digits, '-' or '_'")
    if not isinstance(seq, int) or seq < 0 or not isinstance(answers, dict):
        raise InputFileError(f"{where}: 'seq' must be a count and 'answers' an object")
    questions = {q["id"] for q in key["questions"]}
    for trial, given in answers.items():
        if trial not in key["trials"] or not isinstance(given, dict):
            raise InputFileError(f"{where}: trial {str(trial)[:20]!r} is not in this study")
        for q, a in given.items():
            if q not in questions or a not in ANSWERS:
                raise InputFileError(f"{where}: trial {trial}: {str(q)[:20]!r}: {str(a)[:10]!r} is not an answer "
                                     f"to one of this study's questions ({', '.join(ANSWERS)})")
    return data


def _answer_files(folder: Path, files) -> list[Path]:
    found = sorted((folder / "answers").glob("*.json")) if (folder / "answers").is_dir() else []
    for f in map(Path, files):
        if f.is_dir():
            found += sorted(f.glob("*.json"))
        elif f.is_file():
            found.append(f)
        else:
            raise MissingFileError(f"{f}: no such answers file")
    seen, out = set(), []
    for f in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            out.append(f)
    return out


def read_answers(path: Path, key: dict) -> dict:
    if path.stat().st_size > MAX_ANSWERS_FILE:
        raise InputFileError(f"{path}: {path.stat().st_size} bytes is too large for a rater's answers")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as ex:
        raise InputFileError(f"{path}: not JSON ({type(ex).__name__})") from ex
    return check_answers(key, data, str(path))


def tally_study(folder: str | os.PathLike, files=()) -> Tally:
    """Tally the answers in `folder`/answers/ (the server's) and in `files` (downloaded answer
    files, or folders of them) against the study's key."""
    folder = Path(folder)
    key = load_key(folder)
    paths = _answer_files(folder, files)
    given: dict[tuple[str, str, str], str] = {}  # (rater, trial, question) → answer
    for p in paths:
        data = read_answers(p, key)
        for trial, answers in data["answers"].items():
            for q, a in answers.items():
                given[data["rater"], trial, q] = a
    if not given:
        raise OptionError(f"--tally {folder}: no answers found in {folder / 'answers'} or the files given; "
                          "pass the raters' downloaded answer files after the folder")
    systems = tuple(s["name"] for s in key["systems"])
    order = {s: i for i, s in enumerate(systems)}
    counts = {(q["id"], a, b): [0, 0, 0] for q in key["questions"] for a, b in combinations(systems, 2)}
    for (_, trial, q), a in given.items():
        left, right = key["trials"][trial]["a"], key["trials"][trial]["b"]
        first, second = sorted((left, right), key=order.get)
        chosen = {"A": left, "B": right}.get(a)  # None: neither / same
        counts[q, first, second][(first, second, None).index(chosen)] += 1
    questions = tuple(
        QuestionTally(q["id"], q["text"], tuple(PairTally((a, b), *counts[q["id"], a, b])
                                                for a, b in combinations(systems, 2)))
        for q in key["questions"])
    return Tally(study=key["study"], systems=systems, raters=tuple(sorted({r for r, _, _ in given})),
                 files=tuple(map(str, paths)), questions=questions)


def render_table(tally: Tally):
    """A rich Table: one row per question and pair of systems."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Preference study {tally.study}: {len(tally.raters)} rater(s), {tally.answers} answers",
              caption="X %, Y %, = %: shares of all answers for X, for Y and for neither/same; "
                      "X wins: X's share of the answers that chose one, with Wilson's 95 % interval")
    for col, just in (("question", "left"), ("X vs Y", "left"), ("answers", "right"), ("X %", "right"),
                      ("Y %", "right"), ("= %", "right"), ("X wins", "right"), ("95 % CI", "right")):
        t.add_column(col, justify=just)
    for q in tally.questions:
        for p in q.pairs:
            pct, rate, ci = p.percent, p.win_rate, p.win_interval
            t.add_row(escape(q.text), escape(f"{p.systems[0]} vs {p.systems[1]}"), str(p.answers),
                      *(f"{v:.1f}" for v in pct) if pct else ("–",) * 3,
                      f"{100 * rate:.1f} %" if rate is not None else "–",
                      f"{100 * ci[0]:.1f}–{100 * ci[1]:.1f} %" if ci else "–")
        t.add_section()
    return t
