"""The GPU bench scripts run for real only where a GPU is lent; here their smoke modes run on the
CPU, through the same model construction and code paths, so they cannot rot unnoticed between
GPU sessions. (Their figures come from bench/RESULTS.md, never from a test.)"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_diffusion_bench_smoke():
    out = run("bench_diffusion_gpu.py", "--tiny", "--device", "cpu", "--frames", "2", "--steps", "1")
    rows = [line for line in out.splitlines() if line.startswith(("cinefx --temporal", "diffusers "))]
    assert len(rows) == 4, out


def test_train_bench_smoke():
    out = run("bench_train_gpu.py", "--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--resolution", "64")
    assert out.count("steps/s") == 2, out
