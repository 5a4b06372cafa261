"""The VAE decode overlapped with the next batch's denoising (issue 15), on the tiny bundle.

On a CPU the decoder runs the thread the GPU runs, without the CUDA stream; what it returns must
be the bytes `decode_latents` returns in line."""

import threading

import numpy as np
import pytest
import torch

from cinefx.diffusion.models import ModelSpec, SpeedOptions, apply_speed, load_components
from cinefx.diffusion.pipeline import BatchDecoder, TemporalControlPipeline

SIZE = 64  # the tiny bundle's native side: 8×8 latents


def make_pipe(bundle, speed=SpeedOptions()):
    comps = load_components(ModelSpec(base=str(bundle)), ("canny",), "cpu", torch.float32)
    apply_speed(comps, speed)
    return TemporalControlPipeline.from_components(comps, "ddim")


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    return make_pipe(tiny_bundle)


def latents(n, seed=0):
    return torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("cinefx-decode")]


def test_overlap_is_on_by_default_and_follows_the_speed_options(tiny_bundle, pipe):
    assert SpeedOptions().overlap_decode and pipe.overlap_decode
    assert not make_pipe(tiny_bundle, SpeedOptions(overlap_decode=False)).overlap_decode


@pytest.mark.parametrize("n", [1, 2, 5])
def test_overlapped_decode_is_bit_identical_to_decoding_in_line(pipe, monkeypatch, n):
    """1, 2 and 5 frames with `vae_batch` 2 (one slice, a full slice, three slices with a short
    last one): the decoder thread returns exactly `decode_latents`' tensor, and decodes on its own
    thread."""
    monkeypatch.setattr(pipe, "vae_batch", 2)
    x = latents(n, seed=n)
    with torch.inference_mode():
        inline = pipe.decode_latents(x)
    where, real = [], pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z: where.append((threading.current_thread().name, len(z)))
                        or real(z))
    with BatchDecoder(pipe) as decoder:
        images = decoder.submit(x).result()
    assert images.dtype == inline.dtype == torch.float32 and images.shape == (n, 3, SIZE, SIZE)
    assert torch.equal(images, inline)
    # made in inference mode, as in line: no autograd graph holding the decoder's activations
    assert images.is_inference() and not images.requires_grad
    assert [k for _, k in where] == [2] * (n // 2) + [1] * (n % 2)
    assert all(name.startswith("cinefx-decode") for name, _ in where), where


def test_pipeline_without_decode_leaves_the_images_to_the_decoder(pipe):
    """`decode=False` returns the same latents and no images; decoding them on the decoder gives
    the images of a call that decodes itself."""
    g = torch.Generator().manual_seed(4)
    frames = torch.rand(3, 3, SIZE, SIZE, generator=g)
    kw = dict(prompt="epic film still", strength=0.8, steps=2, temporal="full")
    args = (frames, {"canny": (frames > 0.5).float()}, torch.randn(3, 4, 8, 8, generator=g))
    whole, split = pipe(*args, **kw), pipe(*args, decode=False, **kw)
    assert split.images is None and torch.equal(split.latents, whole.latents)
    with BatchDecoder(pipe) as decoder:
        assert torch.equal(decoder.submit(split.latents).result(), whole.images)


def test_without_overlap_submit_decodes_in_line(pipe, monkeypatch):
    """`overlap_decode` off: the same calls decode in the caller's thread, at `submit`, and start
    no thread."""
    monkeypatch.setattr(pipe, "overlap_decode", False)
    where, real = [], pipe.decode_latents
    monkeypatch.setattr(pipe, "decode_latents", lambda x: where.append(threading.current_thread()) or real(x))
    x = latents(3)
    with BatchDecoder(pipe) as decoder:
        job = decoder.submit(x)
        assert where == [threading.current_thread()] and not decode_threads()
        with torch.inference_mode():
            assert torch.equal(job.result(), real(x))


def test_submit_returns_while_the_decode_runs(pipe, monkeypatch):
    """The caller goes on (to denoise the next batch) while the decode runs: here the decode waits
    for the caller to act after `submit` has returned, which a decode run inside `submit` never sees."""
    go, real = threading.Event(), pipe.decode_latents

    def decode(x):
        if not go.wait(timeout=10):
            raise TimeoutError("the decode ran before submit returned")
        return real(x)

    monkeypatch.setattr(pipe, "decode_latents", decode)
    with BatchDecoder(pipe) as decoder:
        job = decoder.submit(latents(2))
        go.set()
        assert job.result().shape == (2, 3, SIZE, SIZE)


def test_one_decode_at_a_time_in_order_and_errors_surface_at_result(pipe, monkeypatch):
    """Batches submitted together decode one at a time (the memory bound), in order; an exception
    in the decode thread is raised at that batch's `result()` as the very exception, and the
    batches after it decode as usual."""
    boom = MemoryError("decode ran out")
    real, calls, running = pipe.decode_latents, [], []

    def decode(x):
        running.append(1)
        calls.append((len(x), len(running)))
        threading.Event().wait(0.05)  # long enough for a second thread to start, were there one
        running.pop()
        if len(calls) == 2:
            raise boom
        return real(x)

    monkeypatch.setattr(pipe, "decode_latents", decode)
    batches = [latents(n, seed=n) for n in (2, 1, 3)]
    with BatchDecoder(pipe) as decoder:
        jobs = [decoder.submit(x) for x in batches]
        first = jobs[0].result()
        with pytest.raises(MemoryError) as err:
            jobs[1].result()
        assert err.value is boom
        last = jobs[2].result()
    assert calls == [(2, 1), (1, 1), (3, 1)]
    with torch.inference_mode():
        assert torch.equal(first, real(batches[0])) and torch.equal(last, real(batches[2]))


def test_close_and_interrupts_leave_no_thread(pipe, monkeypatch):
    """`close()` ends the thread; a run stopped (Ctrl-C) with a decode still running waits for it
    on the way out rather than leaving the thread behind."""
    assert not decode_threads()
    decoder = BatchDecoder(pipe)
    decoder.submit(latents(1)).result()
    assert decode_threads()
    decoder.close()
    assert not decode_threads()

    started, real = threading.Event(), pipe.decode_latents

    def slow(x):
        started.set()
        threading.Event().wait(0.2)  # still running when the interrupt unwinds the caller
        return real(x)

    monkeypatch.setattr(pipe, "decode_latents", slow)
    with pytest.raises(KeyboardInterrupt):
        with BatchDecoder(pipe) as decoder:
            decoder.submit(latents(2))
            started.wait(timeout=30)
            raise KeyboardInterrupt
    assert not decode_threads()


def test_decode_memory_counts_the_decode_in_flight(tiny_bundle, pipe, monkeypatch):
    """With overlap the batch sizing keeps room for one decode: the VAE's peak over one slice,
    measured (CUDA's counters faked, the same calls run here), plus the other frames' images;
    decoding in line needs none, since it runs after the denoising has freed its memory."""
    calls, real = [], pipe.decode_latents
    monkeypatch.setattr(pipe, "decode_latents", lambda x: calls.append(tuple(x.shape)) or real(x))
    monkeypatch.setattr(pipe, "vae_batch", 2)
    peak = iter([1_000, 9_000])  # memory_allocated, then max_memory_allocated
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: next(peak))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: next(peak))
    assert pipe.decode_memory(SIZE, SIZE, 5) == 8_000 + 2 * 3 * (3 * SIZE * SIZE * 4)
    assert calls == [(2, 4, 8, 8)]
    monkeypatch.setattr(pipe, "overlap_decode", False)
    assert pipe.decode_memory(SIZE, SIZE, 5) == 0 and len(calls) == 1


def test_compiled_decoder_runs_on_the_decode_thread(tiny_bundle):
    """With --compile the VAE decoder is a compiled module; called from the decode thread it runs
    compiled (backend "eager": the tracing alone) and returns the in-line bytes."""
    from torch._dynamo.utils import counters

    fast = make_pipe(tiny_bundle, SpeedOptions(compile=True, compile_backend="eager"))
    x = latents(3)
    frames_before = counters["frames"]["ok"]
    with BatchDecoder(fast) as decoder:
        images = decoder.submit(x).result()
    assert counters["frames"]["ok"] > frames_before  # traced from the thread
    with torch.inference_mode():
        assert torch.equal(images, fast.decode_latents(x))


# -- the engine ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def take():
    """9 frames of a push-in over a real photograph, 96x64: batches of 2, 2, 2, 2 and 1."""
    from cinefx.testing.clips import Move, render_move

    return np.stack(list(render_move(Move("astronaut", 9, (0.45, 0.4, 0.9), (0.5, 0.45, 0.75)), (96, 64))))


def engine(bundle, overlap, **diffusion):
    """The epic preset (canny and depth, colour anchoring) in batches of 2, temporal full, the
    residual noise prior; decodes overlapped or in line."""
    from cinefx.engines import build_diffusion_engine
    from cinefx.presets import load_preset, override
    from cinefx.renderers import EngineSettings

    cfg = dict(chunk=2, steps=2, strength=0.8, temporal="full", noise_prior="residual", **diffusion)
    eng = build_diffusion_engine(override(load_preset("epic"), "diffusion", **cfg), ModelSpec(base=str(bundle)),
                                 EngineSettings(seed=3))
    eng.pipe.overlap_decode = overlap
    return eng


def test_engine_with_overlap_renders_the_in_line_bytes(tiny_bundle, take, monkeypatch):
    """A scene in batches of 2, over two calls: with the decode of each batch overlapping the next
    one's denoising, every frame (colour anchoring, detail) and the scene state later pieces start
    from are byte-identical to decoding in line, and to the same batches rendered one call each
    (where no batch has another to overlap, so none can be reordered or mixed with another); the
    decodes ran on the decode thread, a batch each, in order."""
    single = engine(tiny_bundle, False)
    apart = np.concatenate([single.render(take[i:j], 2) for i, j in ((0, 2), (2, 4), (4, 5), (5, 7), (7, 9))])
    inline = engine(tiny_bundle, False)
    off = np.concatenate([inline.render(take[:5], 2), inline.render(take[5:], 2)])
    assert np.array_equal(off, apart)
    eng = engine(tiny_bundle, True)
    decoded, real = [], eng.pipe.decode_latents
    monkeypatch.setattr(eng.pipe, "decode_latents", lambda x: decoded.append(
        (threading.current_thread().name, len(x))) or real(x))
    on = np.concatenate([eng.render(take[:5], 2), eng.render(take[5:], 2)])
    assert on.shape == take.shape and np.array_equal(on, off)
    assert [n for _, n in decoded] == [2, 2, 1, 2, 2] and all(t.startswith("cinefx-decode") for t, _ in decoded)
    a, b = eng.scene_state(), inline.scene_state()
    assert torch.equal(a.first.latents, b.first.latents) and a.extractors == b.extractors
    assert all(np.array_equal(x, y) for x, y in zip(a.colour_ref, b.colour_ref))
    assert not decode_threads()  # each call closes its decoder


def test_engine_stopped_between_batches_leaves_no_decode_thread(tiny_bundle, take, monkeypatch):
    """Ctrl-C seen between batches (a decode in flight) unwinds through the decoder: its thread
    ends with the call, and the engine renders on afterwards."""
    from cinefx import interrupt

    eng = engine(tiny_bundle, True)
    checks = iter([None, None, KeyboardInterrupt])

    def check():
        if (stop := next(checks, None)) is not None:
            raise stop

    monkeypatch.setattr(interrupt, "check", check)
    with pytest.raises(KeyboardInterrupt):
        eng.render(take, 0)
    assert not decode_threads()
    assert eng.render(take[:3], 1).shape == (3, 64, 96, 3)
