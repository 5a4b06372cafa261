"""Speed and memory ratios of the foundation, each measured side by side in one run.

    .venv/bin/python bench/bench_foundation.py [--quick]

1. grade engine ÷ plain transcode: `cinefx stylize --engine grade` (with and without the metrics)
   against decode → RGB → libx264 of the same file with the same crf/preset. Goal ≤ 1.5. Also
   printed: x264 alone encoding the already graded frames ÷ the same transcode, the floor that
   the grade's film grain sets for this ratio.
2. scene split fps ÷ PySceneDetect AdaptiveDetector fps on the same file. Goal ≥ 1.0.
3. peak RSS of stylize on a 1-minute vs a 6-minute clip (separate processes). Goal ≤ 1.2.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cinefx.testing.clips import Move, render_move, write_clip  # noqa: E402


def long_clip(path, seconds, size, fps=24):
    moves = [Move(p, fps * 4, (0.4, 0.45, 0.95), (0.6, 0.5, 0.7)) for p in ("astronaut", "coffee", "chelsea", "rocket")]

    def frames():
        n = 0
        while n < seconds * fps:
            for m in moves:
                for f in render_move(m, size):
                    if n >= seconds * fps:
                        return
                    yield f
                    n += 1

    return write_clip(path, frames(), fps=fps, audio="aac", options={"crf": "23", "preset": "veryfast"})


def encode_rgb(frames, dst, rate, size, crf="18", preset="medium"):
    """RGB frames → yuv420p → libx264 into `dst`, PyAV's defaults otherwise."""
    with av.open(str(dst), "w") as cout:
        s = cout.add_stream("libx264", rate=rate, options={"crf": crf, "preset": preset})
        s.width, s.height, s.pix_fmt = size[0], size[1], "yuv420p"
        for rgb in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")):
                cout.mux(p)
        for p in s.encode(None):
            cout.mux(p)


def plain_transcode(src, dst):
    t = time.perf_counter()
    with av.open(str(src)) as cin:
        vin = cin.streams.video[0]
        vin.thread_type = "AUTO"
        size = vin.codec_context.width, vin.codec_context.height
        encode_rgb((f.to_ndarray(format="rgb24") for f in cin.decode(vin)), dst, vin.average_rate, size)
    return time.perf_counter() - t


def graded_encode_time(src, dst):
    """x264 alone on frames the epic grade has already made (held in memory): the part of the
    grade engine's time that is the encoder's, since grain costs x264 far more than clean frames.
    The ratio this gives is the floor of goal 1 on this machine, whatever the grading costs."""
    from cinefx.grade.grader import Grader
    from cinefx.presets import load_preset

    with av.open(str(src)) as cin:
        vin = cin.streams.video[0]
        size = vin.codec_context.width, vin.codec_context.height
        grader = Grader(load_preset("epic").grade, size)
        graded = [grader.grade_frame(f.to_ndarray(format="rgb24"), i) for i, f in enumerate(cin.decode(vin))]
        rate = vin.average_rate
    return timed(lambda: encode_rgb(graded, dst, rate, size))


def grading_fps(src, workers, frames=96):
    """Frames per second of the epic grade alone (frames decoded beforehand), on `workers` threads:
    how the grade scales on machines with cores to spare beyond x264's."""
    from cinefx.grade.grader import Grader
    from cinefx.presets import load_preset

    with av.open(str(src)) as cin:
        rgb = [f.to_ndarray(format="rgb24") for f, _ in zip(cin.decode(video=0), range(frames))]
    grader = Grader(load_preset("epic").grade, (rgb[0].shape[1], rgb[0].shape[0]), workers=workers)
    try:
        t = timed(lambda: list(grader.grade_many(zip(rgb, range(len(rgb))))))
    finally:
        grader.close()
    return len(rgb) / t


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def best_of(n, measure):
    """The fastest of n runs: both sides of a ratio get the same warm caches and the same luck."""
    return min(measure() for _ in range(n))


def grade_time(src, dst, metrics, grain=True):
    """`stylize --engine grade --preset epic` in-process: the same work as the CLI without the
    interpreter start-up, so both sides of the ratio are measured alike. grain=False measures the
    same grade without its film grain, which x264 spends most of the extra time encoding."""
    from cinefx.presets import load_preset, override
    from cinefx.stylize import StylizeOptions, stylize_file

    preset = load_preset("epic") if grain else override(load_preset("epic"), "grade", grain=0.0)
    t = time.perf_counter()
    stylize_file(src, dst, preset, StylizeOptions(engine="grade", overwrite=True, metrics=metrics))
    return time.perf_counter() - t


def scenes_time(src):
    """What `cinefx scenes` does, in-process: thumbnails straight from the decoder, the detector."""
    from cinefx.scenes import detect_scenes, thumbnail_size
    from cinefx.video.probe import probe
    from cinefx.video.reader import read_frames

    t = time.perf_counter()
    info = probe(src)
    detect_scenes(f.rgb for f in read_frames(info, size=thumbnail_size(info.width, info.height), exact=False))
    return time.perf_counter() - t


def rss_of(args):
    """Peak RSS (MiB) of `cinefx ARGS` in a fresh process. Read from the child's own VmHWM: the
    ru_maxrss that wait4 reports counts the parent's memory at fork, before exec (this script
    holds ~1 GB by then), which made the first measurement meaningless."""
    out = Path(tempfile.mkstemp(suffix=".hwm")[1])
    code = ("import runpy, sys\n"
            "sys.argv = ['cinefx', *sys.argv[2:]]\n"
            "try:\n"
            "    runpy.run_module('cinefx', run_name='__main__')\n"
            "finally:\n"
            f"    open({str(out)!r}, 'w').write(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n")
    subprocess.run([sys.executable, "-c", code, "x", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return int(out.read_text()) / 1024


def main():
    quick = "--quick" in sys.argv
    tmp = Path(tempfile.mkdtemp(prefix="cinefx-bench-"))
    sample = ROOT / "samples" / "sample.mp4"
    hd = long_clip(tmp / "hd720.mp4", 5 if quick else 12, (1280, 720))
    print(f"# cinefx foundation bench — {time.strftime('%Y-%m-%d')} — {os.cpu_count()} cores")
    print("\n## 1. grade engine / plain transcode (decode → RGB → libx264 crf 18 medium); goal ≤ 1.5")
    for name, src in (("sample 640x360", sample), ("720p", hd)):
        base = best_of(2, lambda: plain_transcode(src, tmp / "plain.mp4"))
        g = best_of(2, lambda: grade_time(src, tmp / "g.mp4", metrics=False))
        gm = best_of(2, lambda: grade_time(src, tmp / "g.mp4", metrics=True))
        ng = best_of(2, lambda: grade_time(src, tmp / "g.mp4", metrics=False, grain=False))
        floor = best_of(2, lambda: graded_encode_time(src, tmp / "floor.mp4"))
        print(f"{name}: transcode {base:.2f}s | grade {g:.2f}s → ratio {g / base:.2f} | "
              f"grade+report {gm:.2f}s → ratio {gm / base:.2f} | grade without grain {ng:.2f}s → ratio {ng / base:.2f} | "
              f"x264 alone on the graded frames {floor:.2f}s → ratio {floor / base:.2f}")

    one, two = (max(grading_fps(hd, w) for _ in range(2)) for w in (1, 2))
    print(f"grading alone, 720p (informative): 1 thread {one:.0f} fps | 2 threads {two:.0f} fps → ×{two / one:.2f}")

    print("\n## 2. scene split fps / PySceneDetect AdaptiveDetector fps (same file, both decode it); goal ≥ 1.0")
    import scenedetect

    for name, src in (("sample 640x360", sample), ("720p", hd)):
        n = av.open(str(src)).streams.video[0].frames
        ours = best_of(3, lambda: scenes_time(src))
        theirs = best_of(3, lambda: timed(lambda: scenedetect.detect(str(src), scenedetect.AdaptiveDetector())))
        print(f"{name}: cinefx {n / ours:.0f} fps | PySceneDetect {n / theirs:.0f} fps → ratio {theirs / ours:.2f}")

    print("\n## 3. peak RSS, 1-minute vs 6-minute clip (640x360, grade + report); goal ≤ 1.2")
    minutes = (0.25, 1.5) if quick else (1, 6)
    rss = []
    for m in minutes:
        clip = long_clip(tmp / f"m{m}.mp4", int(60 * m), (640, 360))
        rss.append(rss_of(["stylize", str(clip), "-o", str(tmp / f"o{m}.mp4"), "--engine", "grade", "-q"]))
        print(f"{m}-minute clip: peak RSS {rss[-1]:.0f} MiB")
    print(f"ratio {rss[1] / rss[0]:.2f}")


if __name__ == "__main__":
    main()
