"""Make samples/sample.mp4: ten seconds of camera moves over real photographs (they ship inside
scikit-image), joined by two hard cuts, a dissolve and a fade, with a music-like AAC track.

    .venv/bin/python samples/make_sample.py [OUT]
"""

import sys
from pathlib import Path

from cinefx.testing.clips import Move, dissolve, fade_through_black, render_move, write_clip

SIZE = (640, 360)
FPS = 24


def frames():
    shots = [
        Move("astronaut", 60, (0.45, 0.35, 0.95), (0.52, 0.3, 0.55)),  # slow push-in on the face
        Move("coffee", 54, (0.3, 0.5, 0.8), (0.7, 0.5, 0.8)),  # pan across the table
        Move("chelsea", 60, (0.5, 0.5, 1.0), (0.42, 0.42, 0.7)),  # drift onto the cat
        Move("rocket", 54, (0.5, 0.75, 0.7), (0.5, 0.3, 0.7)),  # tilt up the launch tower
        Move("motorcycle_left", 48, (0.35, 0.55, 0.9), (0.6, 0.5, 0.9)),  # truck along the bike
    ]
    a, b, c, d, e = (list(render_move(m, SIZE)) for m in shots)
    out = a + dissolve(b, c, 14)  # hard cut into b, dissolve b → c
    out = fade_through_black(out, d, out_len=10, in_len=10, hold=3)  # fade c → d
    return out + e  # hard cut d → e


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sample.mp4")
    write_clip(out, frames(), fps=FPS, audio="aac", options={"crf": "21", "preset": "slow"})
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
