"""The core every feature builds on: one scene stream, one renderer interface, scene tasks, options
resolved at the edge, imports that flow one way."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cinefx.cli import app
from cinefx.presets import load_preset, override
from cinefx.scenes import SceneStream, detect_scenes
from cinefx.testing.clips import Move, cut, render_move, write_clip

SHOTS = (Move("astronaut", 9), Move("coffee", 14), Move("rocket", 5), Move("astronaut", 20, (0.3, 0.3, 0.5)))


@pytest.fixture(scope="module")
def four_shots(tmp_path_factory):
    """A clip of four shots (9, 14, 5 and 20 frames): cuts at 9, 23 and 28."""
    return write_clip(tmp_path_factory.mktemp("core") / "four.mp4", cut(*SHOTS, size=(96, 64)), fps=24, audio=None)


# -- the scene stream -----------------------------------------------------------------------------

@pytest.mark.parametrize("run_length", [1, 4, 6, 48])
def test_scene_runs_are_cut_from_each_scene_start_and_never_cross_a_cut(run_length):
    frames = list(cut(*SHOTS, size=(96, 64)))
    consumed = []

    def source():
        for i, f in enumerate(frames):
            consumed.append(i)
            yield f

    stream = SceneStream(source(), run_length)
    runs = []
    for run in stream:
        # bounded memory: nothing waits longer than the detector's lookahead and one run
        assert len(consumed) - run.start <= run_length + 40
        runs.append(run)
    scenes = stream.scenes
    assert [s.start for s in scenes] == [0, 9, 23, 28] and [s.kind for s in scenes] == ["start", "cut", "cut", "cut"]
    assert scenes == detect_scenes(frames) and stream.count == len(frames)
    assert [i for r in runs for i in range(r.start, r.start + len(r.items))] == list(range(len(frames)))
    for r in runs:
        s = scenes[r.scene]
        assert s.index == r.scene and r.kind == s.kind and 1 <= len(r.items) <= run_length
        assert s.start <= r.start and r.start + len(r.items) <= s.end  # within one scene
        assert r.at == r.start - s.start and r.at % run_length == 0
        assert r.first == (r.at == 0) and r.last == (r.start + len(r.items) == s.end)
        assert all(a is frames[r.start + k] for k, a in enumerate(r.items))  # handed on, not copied


def test_stylize_preview_and_scenes_split_a_clip_identically(four_shots, tmp_path):
    from cinefx.stylize import StylizeOptions, list_scenes, preview_file, stylize_file

    opts = StylizeOptions(engine="grade", metrics=True)
    res = stylize_file(four_shots, tmp_path / "out.mp4", load_preset("epic"), opts)
    pre = preview_file(four_shots, tmp_path / "sheet.png", load_preset("epic"), opts)
    listed = list_scenes(four_shots)
    assert [s.start for s in res.scenes] == [0, 9, 23, 28]
    assert res.scenes == pre.scenes == listed.scenes  # one numbering: 0-based index everywhere
    r = CliRunner().invoke(app, ["scenes", str(four_shots), "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["frames"] == 48 and [row["scene"] for row in shown["scenes"]] == [1, 2, 3, 4]  # users see 1-based
    assert [(row["start_frame"], row["end_frame"]) for row in shown["scenes"]] == [(s.start, s.end) for s in res.scenes]
    assert shown["scenes"] == list(listed.rows)


# -- renderers ------------------------------------------------------------------------------------

def test_renderer_registry_names_every_engine_and_grade_streams_without_copies():
    from cinefx.engines import ENGINES, RENDERERS, build_renderer
    from cinefx.renderers import RUN_FRAMES, DiffusionRenderer, GradeRenderer

    assert RENDERERS == {"grade": GradeRenderer, "diffusion": DiffusionRenderer}
    assert ENGINES == ("auto", "grade", "diffusion")
    frames = [f for f in render_move(Move("coffee", 5), (64, 48))]
    epic = load_preset("epic")
    r = build_renderer("grade", epic, (64, 48), seed=3)
    assert r.name == "grade" and r.run_length == RUN_FRAMES
    out = list(r.render(frames, 0, 10))
    from cinefx.grade.grader import Grader

    assert np.array_equal(np.stack(out), Grader(epic.grade, (64, 48), seed=3)(np.stack(frames), 10))
    r.close()


@pytest.mark.parametrize("chunk, batch, run", [(8, 0, 48), (5, 0, 45), (64, 0, 64), (8, 12, 48), (8, 50, 50)])
def test_diffusion_runs_are_whole_batches_and_never_cap_a_presets_chunk(chunk, batch, run):
    """Runs are the unit the scene stream hands on; a preset's chunk (or --batch) above the run
    length used to be cut down to it (StylizeOptions.chunk = 48) without a word."""
    from types import SimpleNamespace

    from cinefx.renderers import DiffusionRenderer, EngineSettings

    preset = override(load_preset("epic"), "diffusion", chunk=chunk)
    r = DiffusionRenderer(preset, (64, 48), 0, SimpleNamespace(settings=EngineSettings(batch=batch)))
    assert r.run_length == run and r.run_length % (batch or chunk) == 0


def test_a_scene_task_renders_what_the_whole_run_rendered(tiny_bundle, four_shots, tmp_path, monkeypatch):
    """Any worker can render any scene: scene 2 (0-based 1) rendered alone from the input equals
    the frames the local orchestrator rendered for it."""
    from cinefx import renderers
    from cinefx.diffusion.models import ModelSpec
    from cinefx.stylize import SceneTask, StylizeOptions, resolve_options, run_scene_task, stylize_file

    preset = override(load_preset("epic"), "diffusion", steps=1, chunk=4)
    opts = StylizeOptions(engine="diffusion", models=ModelSpec(base=str(tiny_bundle)), metrics=False,
                          resume=False, seed=7)
    seen, real = {}, renderers.DiffusionRenderer.render

    def keep(self, frames, scene, start):
        out = [np.array(o) for o in real(self, frames, scene, start)]
        seen.setdefault(scene, []).extend(out)
        return out

    monkeypatch.setattr(renderers.DiffusionRenderer, "render", keep)
    res = stylize_file(four_shots, tmp_path / "whole.mp4", preset, opts)
    monkeypatch.setattr(renderers.DiffusionRenderer, "render", real)
    resolved, _ = resolve_options(preset, opts)
    alone = np.concatenate(list(run_scene_task(SceneTask(four_shots, res.scenes[1], preset, resolved))))
    assert alone.shape == (14, 64, 96, 3)
    assert np.array_equal(alone, np.stack(seen[1]))


# -- options at the edge, imports one way -----------------------------------------------------------

def test_cli_defaults_are_the_dataclasses_defaults():
    """The training command saved a checkpoint every 100 steps while TrainConfig said 0."""
    import typer

    from cinefx.renderers import EngineSettings
    from cinefx.stylize import StylizeOptions
    from cinefx.train.loop import TrainConfig
    from cinefx.video.writer import EncodeOptions

    params = {c.name: {p.name: p.default for p in c.params} for c in typer.main.get_command(app).commands.values()}
    train = params["train-preset"]
    for name in ("checkpoint_every", "epochs", "repeats", "batch", "resolution", "rank", "alpha", "vectors",
                 "lr", "noise_offset", "class_prompt", "class_images", "prior_loss_weight", "seed", "precision",
                 "method", "steps"):
        assert train[name] == TrainConfig.__dataclass_fields__[name].default, name
    assert train["min_snr"] == TrainConfig.__dataclass_fields__["min_snr_gamma"].default
    st = params["stylize"]
    for name in ("size", "batch", "scheduler", "precision"):
        assert st[name] == EngineSettings.__dataclass_fields__[name].default, name
    for name in ("crf", "x264_preset"):
        assert st[name] == EncodeOptions.__dataclass_fields__[name].default, name
    for name in ("engine", "seed"):
        assert st[name] == StylizeOptions.__dataclass_fields__[name].default, name


def _imports(path: Path, modules: dict) -> set[str]:
    """cinefx modules `path` imports, at the top or inside functions."""
    out = set()

    def owner(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        out |= {owner(n) for n in names if n.startswith("cinefx")}
    return out - {"cinefx", ""}


def test_no_import_cycles_in_cinefx():
    """engines imported the diffusion engine, which imported engines back (for EngineSettings)."""
    root = Path(__file__).resolve().parents[1] / "cinefx"
    modules = {}
    for p in root.rglob("*.py"):
        name = ".".join(("cinefx", *p.relative_to(root).with_suffix("").parts))
        modules[name.removesuffix(".__init__")] = p
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for n in graph.get(todo.pop(), ()):
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        return seen

    cycles = sorted(m for m in graph if m in reach(m))
    assert cycles == [], cycles


def test_cli_help_imports_no_torch():
    code = ("import sys; from typer.testing import CliRunner; from cinefx.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'av', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_resume_key_holds_how_the_engine_runs_on_the_cpu():
    """What a render depends on beyond the look is fixed for the run and keyed: on the CPU the torch
    thread count (float sums round by it) and the precision; a cluster pins one thread a worker."""
    from cinefx.cluster import pinned
    from cinefx.engines import speed_key
    from cinefx.renderers import EngineSettings
    from cinefx.stylize import StylizeOptions

    preset = load_preset("epic")
    one, two = (speed_key(preset, EngineSettings(threads=n)) for n in (1, 2))
    assert one != two and (one["device"], one["dtype"], one["threads"], two["threads"]) == ("cpu", "torch.float32", 1, 2)
    assert speed_key(preset, EngineSettings())["threads"] >= 1  # torch's default, whatever it is here
    assert pinned(preset, StylizeOptions()).diffusion.threads == 1
