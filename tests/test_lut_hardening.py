"""LUT, preset and config files from strangers: one-line errors that name the file, the line and
the problem (never the file's text), bounded reads, and `.cube` files written whole or not at all."""

import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cinefx.config import model_defaults
from cinefx.errors import ConfigError, LutError, PresetError
from cinefx.grade import lut as lutlib
from cinefx.grade.grader import Grader
from cinefx.presets import load_preset

ROOT = Path(__file__).resolve().parents[1]
ROWS = [f"{r} {g} {b}" for b in (0, 1) for g in (0, 1) for r in (0, 1)]  # the 2³ identity


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Files are named relative to the test's folder, so messages do not depend on its length."""
    monkeypatch.chdir(tmp_path)


def cube(*head: str, rows=ROWS) -> str:
    return "\n".join([*head, *rows]) + "\n"


def rows_with(index: int, row: str) -> list[str]:
    return [row if i == index else r for i, r in enumerate(ROWS)]


# (name, file text, line named in the error (0: the file as a whole), what it says)
HOSTILE = [
    ("domain-min-nan", cube("LUT_3D_SIZE 2", "DOMAIN_MIN nan 0 0"), 2, "DOMAIN_MIN needs 3 finite numbers"),
    ("domain-min-two-values", cube("LUT_3D_SIZE 2", "DOMAIN_MIN 0 0"), 2, "DOMAIN_MIN needs 3 finite numbers"),
    ("domain-max-inf", cube("LUT_3D_SIZE 2", "DOMAIN_MAX 1 inf 1"), 2, "DOMAIN_MAX needs 3 finite numbers"),
    ("domain-max-four-values", cube("DOMAIN_MAX 1 1 1 1", "LUT_3D_SIZE 2"), 1, "DOMAIN_MAX needs 3"),
    ("domain-max-word", cube("LUT_3D_SIZE 2", "DOMAIN_MAX one 1 1"), 2, "DOMAIN_MAX needs 3"),
    ("domain-max-overflow", cube("LUT_3D_SIZE 2", "DOMAIN_MAX 1 1 1e400"), 2, "DOMAIN_MAX needs 3"),
    ("domain-empty", cube("LUT_3D_SIZE 2", "DOMAIN_MIN 0.5 0 0", "DOMAIN_MAX 0.5 1 1"), 3,
     "DOMAIN_MAX must be above DOMAIN_MIN"),
    ("domain-inverted", cube("LUT_3D_SIZE 2", "DOMAIN_MAX 1 -1 1"), 2, "DOMAIN_MAX must be above DOMAIN_MIN"),
    ("range-inverted", cube("LUT_3D_SIZE 2", "LUT_3D_INPUT_RANGE 1 0"), 2, "must be above"),
    ("range-nan", cube("LUT_3D_SIZE 2", "LUT_3D_INPUT_RANGE nan 1"), 2, "LUT_3D_INPUT_RANGE needs 2 finite"),
    ("size-0", cube("LUT_3D_SIZE 0"), 1, "LUT_3D_SIZE out of range"),
    ("size-1", cube('TITLE "one"', "LUT_3D_SIZE 1"), 2, "LUT_3D_SIZE out of range"),
    ("size-huge", cube("LUT_3D_SIZE 100000000000000000000"), 1, "LUT_3D_SIZE out of range"),
    ("size-above-spec", cube("LUT_3D_SIZE 257"), 1, "LUT_3D_SIZE out of range"),
    ("size-fraction", cube("LUT_3D_SIZE 2.5"), 1, "LUT_3D_SIZE out of range"),
    ("size-nan", cube("LUT_3D_SIZE NaN"), 1, "LUT_3D_SIZE out of range"),
    ("size-negative", cube("LUT_3D_SIZE -2"), 1, "LUT_3D_SIZE out of range"),
    ("size-missing", cube("LUT_3D_SIZE"), 1, "LUT_3D_SIZE out of range"),
    ("size-two-values", cube("LUT_3D_SIZE 2 2"), 1, "LUT_3D_SIZE out of range"),
    ("size-1d-huge", cube("LUT_1D_SIZE 70000"), 1, "LUT_1D_SIZE out of range"),
    ("size-200-with-8-rows", cube("LUT_3D_SIZE 200"), 9, "stops after 8 of 8000000 rows"),
    ("two-sizes", cube("LUT_3D_SIZE 2", "LUT_1D_SIZE 8"), 2, "a second LUT size line"),
    ("no-size", cube('TITLE "x"'), 0, "no LUT_3D_SIZE or LUT_1D_SIZE"),
    ("empty", "", 0, "no LUT_3D_SIZE or LUT_1D_SIZE"),
    ("unknown-keyword", cube("LUT_3D_SIZE 2", "LUT_3D_SHAPE 2"), 2, "unknown keyword"),
    ("only-comments", cube("LUT_3D_SIZE 2", *["# x"] * 20_000), 10_001, "no table in the first 10000 lines"),
    ("value-nan", cube("LUT_3D_SIZE 2", rows=rows_with(3, "0 nan 1")), 5, "not a finite number"),
    ("value-inf", cube("# c", "LUT_3D_SIZE 2", rows=rows_with(7, "inf 1 1")), 10, "not a finite number"),
    ("value-minus-infinity", cube("LUT_3D_SIZE 2", rows=rows_with(0, "-Infinity 0 0")), 2, "not a finite"),
    ("value-beyond-float32", cube("LUT_3D_SIZE 2", rows=rows_with(6, "0 1e39 1")), 8, "not a finite number"),
    ("row-two-values", cube("LUT_3D_SIZE 2", rows=rows_with(2, "0 1")), 4, "this line has 2 values"),
    ("row-four-values", cube("LUT_3D_SIZE 2", rows=rows_with(5, "1 0 1 0")), 7, "this line has 4 values"),
    ("row-word", cube("LUT_3D_SIZE 2", rows=rows_with(4, "0 zero 1")), 6, "not a finite number"),
    ("row-hex", cube("LUT_3D_SIZE 2", rows=rows_with(1, "0x1 0 0")), 3, "not a finite number"),
    ("keyword-in-table", cube("LUT_3D_SIZE 2", rows=[*ROWS[:4], 'TITLE "late"', *ROWS[4:]]), 6, "has 2 values"),
    ("rows-too-few", cube("LUT_3D_SIZE 2", rows=ROWS[:7]), 8, "stops after 7 of 8 rows"),
    ("rows-too-many", cube("LUT_3D_SIZE 2", rows=[*ROWS, "0 0 0", "# end"]), 10, "more table rows than the 8"),
    ("not-utf8", cube("LUT_3D_SIZE 2", rows=rows_with(2, "0 \udcff 0")), 4, "not UTF-8"),
    ("not-utf8-header", cube('TITLE "\udcfe"', "LUT_3D_SIZE 2"), 1, "not UTF-8"),
    ("old-mac-line-ends", "LUT_3D_SIZE 2\r" + "\r".join(ROWS), 1, "LUT_3D_SIZE out of range"),
]


@pytest.mark.parametrize("text,line,what", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_cube_gives_one_line_lut_error_naming_file_line_and_problem(text, line, what):
    Path("hostile.cube").write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(LutError) as info:  # any other exception type fails the test
        lutlib.read_cube("hostile.cube")
    msg = str(info.value)
    assert msg.startswith(f"hostile.cube:{line}: " if line else "hostile.cube: "), msg
    assert what in msg and "\n" not in msg and len(msg) < 300, msg


def test_fuzzed_cubes_give_a_lut_or_a_lut_error(tmp_path):
    """Random damage to a valid cube (hostile tokens, lost or repeated lines): read_cube returns a
    finite LUT in [0, 1] or raises LutError, never anything else."""
    tokens = ["nan", "-inf", "1e39", "-1e400", "", "0 0", "0 0 0 0", "2", "0", "-1", "1.5", "LUT_3D_SIZE",
              "LUT_1D_SIZE 8", "LUT_3D_SIZE 1", "DOMAIN_MIN", "DOMAIN_MAX 1 1", "DOMAIN_MIN 1 1 1",
              "LUT_1D_INPUT_RANGE 0", "TITLE", "#", '"', "\x00", "é", "\udcff", "9" * 40, "0x10", "1_0",
              "-", ".", "e5", "\r", "\t", "\ufeff"]
    base = cube('TITLE "t"', "LUT_3D_SIZE 2", "DOMAIN_MIN 0 0 0", "DOMAIN_MAX 1 1 1").splitlines()
    rng = random.Random(1)
    p = tmp_path / "fuzz.cube"
    outcomes = {"lut": 0, "error": 0}
    for _ in range(600):
        lines = list(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            op = rng.choice(("token", "token", "line", "drop", "repeat"))
            if op == "token":
                words = lines[i].split() or [""]
                words[rng.randrange(len(words))] = rng.choice(tokens)
                lines[i] = " ".join(words)
            elif op == "line":
                lines[i] = rng.choice(tokens)
            elif op == "drop" and len(lines) > 1:
                del lines[i]
            else:
                lines.insert(i, lines[i])
        p.write_bytes("\n".join(lines).encode("utf-8", "surrogateescape"))
        try:
            lut = lutlib.read_cube(p)
        except LutError as ex:
            assert "\n" not in str(ex) and len(str(ex)) < 300, str(ex)
            outcomes["error"] += 1
        else:
            assert lut.shape in ((2, 2, 2, 3), (8, 3)) and lut.dtype == np.float32
            assert np.isfinite(lut).all() and lut.min() >= 0 and lut.max() <= 1
            outcomes["lut"] += 1
    assert min(outcomes.values()) > 30, outcomes  # the damage both breaks files and leaves some usable


def test_domain_is_resampled_onto_0_1(tmp_path):
    """A LUT sampled on its own input domain (per channel) gives, on [0, 1], the function it samples:
    here (r/2, g, 2b) on r in [0, 2], g in [0.25, 1], b in [0, 0.5], inputs clamped to the domain."""
    n = 5
    lo, hi = np.array([0.0, 0.25, 0.0]), np.array([2.0, 1.0, 0.5])
    x = lo + (hi - lo) * lutlib.identity(n).astype(np.float64)  # the input colour of each node
    table = np.stack([x[..., 0] / 2, x[..., 1], 2 * x[..., 2]], -1)
    rows = [" ".join(f"{v:.6f}" for v in row) for row in table.reshape(-1, 3)]
    p = tmp_path / "domain.cube"
    p.write_text(cube("LUT_3D_SIZE 5", "DOMAIN_MIN 0 0.25 0", "DOMAIN_MAX 2 1 0.5", rows=rows))
    grid = lutlib.identity(n).astype(np.float64)  # the new nodes: 0, .25, .5, .75, 1 (kinks fall on nodes)
    want = np.stack([grid[..., 0] / 2, np.maximum(grid[..., 1], 0.25), 2 * np.minimum(grid[..., 2], 0.5)], -1)
    assert np.allclose(lutlib.read_cube(p), want, atol=1e-5)
    curve = np.linspace(0, 1, 11)  # a 1D identity on [0.5, 1.5] per channel: x -> clamp(x, .5) - .5 on [0, 1]
    p1 = tmp_path / "curve.cube"
    p1.write_text(cube("LUT_1D_SIZE 11", "LUT_1D_INPUT_RANGE 0.5 1.5", rows=[f"{v} {v} {v}" for v in curve]))
    nodes = np.linspace(0, 1, 11)
    assert np.allclose(lutlib.read_cube(p1), np.repeat((np.maximum(nodes, 0.5) - 0.5)[:, None], 3, 1), atol=1e-6)


def test_a_65_cube_and_a_65536_entry_curve_load(tmp_path):
    ident = lutlib.identity(65)
    p = lutlib.write_cube(tmp_path / "big.cube", ident)
    assert 7 << 20 < p.stat().st_size < lutlib.MAX_FILE_BYTES
    assert np.allclose(lutlib.read_cube(p), ident, atol=1e-6)
    curve = np.repeat(np.linspace(0, 1, 65536, dtype=np.float32)[:, None], 3, 1) ** 0.5
    p1 = lutlib.write_cube(tmp_path / "curve.cube", curve)
    assert np.allclose(lutlib.read_cube(p1), curve, atol=1e-6)


@pytest.mark.parametrize("text", [
    "y" * 5_000_000,
    "LUT_3D_SIZE 2\n" + "0 0 " + "z" * 5_000_000 + "\n",
    "LUT_3D_SIZE 2\n" + "0 " * 2_500_000 + "\n",
    'TITLE "' + "x" * 5_000_000 + '"\nLUT_3D_SIZE 2\n' + "\n".join(ROWS),
], ids=["word", "row-ending-in-a-word", "row-of-numbers", "title"])
def test_a_5mb_line_gives_a_short_error(tmp_path, text):
    p = tmp_path / "long.cube"
    p.write_text(text)
    with pytest.raises(LutError) as info:
        lutlib.read_cube(p)
    assert len(str(info.value)) < 300 and "longer than 1024 bytes" in str(info.value)


def test_an_oversized_lut_is_refused_before_it_is_read(tmp_path, monkeypatch):
    p = tmp_path / "huge.cube"
    with open(p, "wb") as f:
        f.truncate(30 << 20)  # sparse: 30 MiB on paper, nothing on disk

    def no_reading(*args, **kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(lutlib, "open", no_reading, raising=False)
    with pytest.raises(LutError, match=r"huge\.cube: 30\.0 MiB is too large for a LUT \(the limit is 16 MiB"):
        lutlib.read_cube(p)


def test_a_hostile_30mb_lut_fails_fast_with_little_memory(tmp_path):
    """Reading a 30 MB `.cube` once cost 700 MB. Measured in a fresh process: the growth of its peak
    resident memory (VmHWM; ru_maxrss would carry pytest's own peak over the exec) while read_cube
    runs."""
    p = tmp_path / "hostile.cube"
    p.write_bytes(b"LUT_3D_SIZE 256\n" + b"0.5 0.5 0.5\n" * (30_000_000 // 12))
    probe = (
        "import re, sys\n"
        "from cinefx.errors import LutError\n"
        "from cinefx.grade.lut import read_cube\n"
        "def peak_mb():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return int(re.search(r'VmHWM:\\s*(\\d+)', f.read()).group(1)) // 1024\n"
        "before = peak_mb()\n"
        "try:\n"
        "    read_cube(sys.argv[1])\n"
        "except LutError as ex:\n"
        "    print('error:', len(str(ex)))\n"
        "print(peak_mb() - before)\n")
    out = subprocess.run([sys.executable, "-c", probe, str(p)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    assert out[0] == "error:" and int(out[1]) < 300, out
    assert int(out[2]) < 100, f"peak memory grew by {out[2]} MB"


def test_write_cube_is_atomic(tmp_path, monkeypatch):
    good = lutlib.write_cube(tmp_path / "look.cube", lutlib.identity(3))
    before = good.read_bytes()

    def savetxt_dies_half_way(f, rows, fmt):
        f.write("0.000000 0.000000 0.000000\n" * (len(rows) // 2))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lutlib.np, "savetxt", savetxt_dies_half_way)
    with pytest.raises(OSError):
        lutlib.write_cube(good, lutlib.identity(5))
    with pytest.raises(OSError):
        lutlib.write_cube(tmp_path / "new.cube", lutlib.identity(5))
    assert good.read_bytes() == before  # the old LUT is whole
    assert sorted(f.name for f in tmp_path.iterdir()) == ["look.cube"]  # no half file, no temporary


SECRET = "hunter2-SECRET-first-line"


def test_a_preset_lut_never_shows_the_file_it_names(tmp_path):
    """A preset from a stranger may name any file as its LUT; the error says which file and why,
    never what is in it."""
    (tmp_path / "secret.txt").write_text(f"{SECRET}\nroot:x:0:0\n")
    (tmp_path / "secret.cube").write_text(f"{SECRET}\nroot:x:0:0\n")
    (tmp_path / "txt.toml").write_text('[grade]\nlut = "secret.txt"\n')
    with pytest.raises(PresetError) as info:
        load_preset("txt.toml")
    assert "grade.lut" in str(info.value) and "must be a .cube file" in str(info.value)
    assert SECRET not in str(info.value)
    (tmp_path / "cube.toml").write_text('[grade]\nlut = "secret.cube"\n')
    grade = load_preset("cube.toml").grade
    with pytest.raises(LutError) as info:
        Grader(grade, (16, 16))
    assert str(info.value).startswith("secret.cube:1: unknown keyword")
    assert SECRET not in str(info.value) and "root" not in str(info.value)
    with pytest.raises(LutError, match="not a .cube file") as info:
        lutlib.read_cube("secret.txt")  # refused by name, before anything is read
    assert SECRET not in str(info.value)


def test_oversized_preset_and_config_are_refused_before_reading(tmp_path, monkeypatch):
    big = tmp_path / "big.toml"
    with open(big, "wb") as f:
        f.truncate(3 << 20)
    with pytest.raises(PresetError, match=r"big\.toml: 3\.0 MiB is too large .*limit is 1 MiB"):
        load_preset(str(big))
    monkeypatch.setenv("CINEFX_CONFIG", str(big))
    with pytest.raises(ConfigError, match=r"big\.toml: 3\.0 MiB is too large"):
        model_defaults()


def assert_clipped(msg: str, start: str):
    """One line naming the file, echoing at most ~80 characters of what the file holds (a message
    may still list the keys it knows)."""
    longest_run = max(len(m.group()) for m in re.finditer(r"(.)\1*", msg))
    assert msg.startswith(start) and "\n" not in msg and longest_run <= 80 and len(msg) < 500, msg[:300]


@pytest.mark.parametrize("body", [
    f'[grade]\ncontrast = "{"c" * 200_000}"\n',
    f'[grade]\n{"k" * 200_000} = 1\n',
    f'{"t" * 200_000} = 1\n',
    f'name = {"9" * 200_000}\n',
    f'[diffusion.controls]\n{"q" * 200_000} = 1\n',
    f'[grade]\nlut = "{"d/" * 100_000}x.cube"\n',
    f'x = {"[" * 200_000}\n',
])
def test_preset_errors_clip_what_they_echo(body):
    Path("long.toml").write_text(body)
    with pytest.raises(PresetError) as info:
        load_preset("long.toml")
    assert_clipped(str(info.value), "long.toml: ")


@pytest.mark.parametrize("body", [
    f'[models]\nbase = {"7" * 200_000}\n',
    f'[models]\n{"m" * 200_000} = "x"\n',
    f'[{"s" * 200_000}]\n',
    f'[models.controlnets]\n{"c" * 200_000} = "x"\n',
    f'[models]\nallow_pickle = "{"p" * 200_000}"\n',
])
def test_config_errors_clip_what_they_echo(monkeypatch, body):
    Path("config.toml").write_text(body)
    monkeypatch.setenv("CINEFX_CONFIG", "config.toml")
    with pytest.raises(ConfigError) as info:
        model_defaults()
    assert_clipped(str(info.value), "config.toml: ")
