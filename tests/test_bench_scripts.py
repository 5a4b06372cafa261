"""The GPU bench scripts run for real only where a GPU is lent; here their smoke modes run on the
CPU, through the same model construction and code paths, so they cannot rot unnoticed between
GPU sessions. (Their figures come from bench/RESULTS.md, never from a test.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, out=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args, *(["--out", str(out)] if out else [])],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_diffusion_bench_smoke(tmp_path):
    """Every kind of row (baseline, temporal modes, decode in line, turbo, compiled turbo) measures
    and lands in diffusion_rows.jsonl; a row the budget cannot fit is written as skipped, not dropped."""
    rows = "none,anchor,full,full+inline,full+turbo,full+turbo+compile"
    run("bench_diffusion_gpu.py", "--tiny", "--device", "cpu", "--frames", "2", "--steps", "1",
        "--compile-backend", "eager", "--rows", rows, out=tmp_path)
    found = [json.loads(line) for line in (tmp_path / "diffusion_rows.jsonl").read_text().splitlines()]
    check = found.pop(1)  # the overlap's bytes against the in-line decode, before the rows
    assert check["identical"] is True, check
    precision = found[-2:]  # after the rows: quality and turbo against eager fp32 (fp32 on the CPU too)
    del found[-2:]
    # compiled only where the compiled row ran: no compile of its own
    assert [p["name"].split(",")[0] for p in precision] == ["precision: cinefx --temporal full",
                                                           "precision: cinefx --temporal full --turbo --compile"]
    assert all(p["levels"] < 2 for p in precision), precision
    assert [r["name"] for r in found] == [
        "diffusers StableDiffusionControlNetImg2ImgPipeline, per frame", "cinefx --temporal none",
        "cinefx --temporal anchor", "cinefx --temporal full", "cinefx --temporal full, decode in line",
        "cinefx --temporal full --turbo", "cinefx --temporal full --turbo --compile"]
    for r in found:
        assert r["fps"] > 0 and r["fps_denoise"] > r["fps"] and r["tflop"] > 0 and r["first_frame_s"] > 0, r
    assert [r["overlap_decode"] for r in found[1:]] == [True, True, True, False, True, True]
    turbo, compiled = found[5], found[6]
    assert turbo["steps"] == 4 and turbo["guidance"] == 1.0 and turbo["tflop"] == compiled["tflop"]
    assert compiled["compiled"] and "compile_s" in compiled
    run("bench_diffusion_gpu.py", "--tiny", "--device", "cpu", "--frames", "2", "--steps", "1", "--rows", "none",
        "--budget", "0", out=tmp_path / "cut")
    cut = [json.loads(line) for line in (tmp_path / "cut" / "diffusion_rows.jsonl").read_text().splitlines()]
    assert "skipped" in cut[2] and "fps" in cut[0] and all("skipped" in r for r in cut[3:]) and len(cut) == 5


def test_train_bench_smoke(tmp_path):
    out = run("bench_train_gpu.py", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--resolution", "64",
              out=tmp_path)
    assert out.count("steps/s") == 2, out
    rows = [json.loads(line) for line in (tmp_path / "train_rows.jsonl").read_text().splitlines()]
    assert [r["gradient_checkpointing"] for r in rows] == [False, True] and all(r["steps_per_s"] > 0 for r in rows)
