"""cinefx.eval: warp error on real-photo footage with known motion, the model-based measures on tiny
random models of the real classes (checked against transformers / sentence-transformers directly),
refusals, JSON / CSV, `every`, and what happens without weights."""

import json
from fractions import Fraction

import cv2
import numpy as np
import pytest

from cinefx.errors import CinefxError, InputFileError, ModelError
from cinefx.eval import EvalModels, EvalModelSpec, WarpMeter, caption_images, evaluate, evaluate_stills
from cinefx.eval.table import COLUMNS, to_csv, to_json, write_json, write_stills_json
from cinefx.eval.warp import FlowEstimator, PairFlow, grey, warp_error
from cinefx.metrics import psnr
from cinefx.testing.clips import Move, photo, render_move, write_clip

SIZE = (160, 90)
SHOTS = (Move("astronaut", 14, (0.45, 0.4, 0.9), (0.55, 0.45, 0.7)),
         Move("coffee", 12, (0.4, 0.5, 1.0), (0.6, 0.5, 0.8)))


def footage():
    """Two shots (a hard cut at frame 14), the camera pushing in and panning over real photos."""
    return [f for m in SHOTS for f in render_move(m, SIZE)], [(0, 14), (14, 26)]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The tiny models' tensors are too small to share between threads: one is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from cinefx.testing.eval_models import write_eval_models

    return write_eval_models(tmp_path_factory.mktemp("eval-models"))


@pytest.fixture(scope="module")
def spec(tiny_eval):
    return EvalModelSpec(**{role: str(path) for role, path in tiny_eval.items()})


@pytest.fixture(scope="module")
def models(spec):
    return EvalModels(spec)  # the users' path: resolve, safetensors, processors, tokenizers


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-clips")
    frames, _ = footage()
    rng = np.random.default_rng(1)
    flicker = [np.clip(f * g, 0, 255).astype(np.uint8) for f, g in zip(frames, rng.uniform(0.9, 1.1, len(frames)))]
    return {"source": write_clip(d / "source.mp4", frames, audio=None),
            "flicker": write_clip(d / "flicker.mp4", flicker, audio=None),
            "short": write_clip(d / "short.mp4", frames[:-1], audio=None),
            "slow": write_clip(d / "slow.mp4", frames, fps=20, audio=None),
            # the same rate on average, but frames 10-12 shown one 1/48 s tick late
            "late": write_clip(d / "late.mp4", frames, time_base=Fraction(1, 48), audio=None,
                               pts=[2 * i + (10 <= i <= 12) for i in range(len(frames))])}


# -- warp error ------------------------------------------------------------------------------

def _scores(frames, scenes, *renders, every=1):
    meter = WarpMeter(every=every)
    for k, (a, b) in enumerate(scenes):
        for t in range(a, b):
            meter.add(k, frames[t], *(r[t] for r in renders))
    meter.finish()
    return meter


def test_warp_error_ranks_the_source_above_flicker_shuffle_and_a_frozen_frame():
    frames, scenes = footage()
    rng = np.random.default_rng(0)
    # a ±10 % gain jitter per frame
    flicker = [np.clip(f * g, 0, 255).astype(np.uint8) for f, g in zip(frames, rng.uniform(0.9, 1.1, len(frames)))]
    shuffled = [frames[a + i] for a, b in scenes for i in rng.permutation(b - a)]
    frozen = [frames[a] for a, b in scenes for _ in range(a, b)]
    meter = _scores(frames, scenes, frames, flicker, shuffled, frozen)
    for s in (*meter.scenes().values(), meter.overall()):
        assert s.renders[0] == pytest.approx(s.source) and s.delta(0) == pytest.approx(0)
        assert s.source < 0.002
        for k in (1, 2, 3):
            assert s.renders[k] > 1.5 * s.source, (s.index, k, s)
    assert meter.overall().pairs == (14 - 1) + (12 - 1)  # never across the cut
    # adjacent PSNR rewards the frozen render, which warp error does not
    frozen_psnr = np.mean([psnr(frozen[t], frozen[t + 1]) for t in range(1, 13)])
    source_psnr = np.mean([psnr(frames[t], frames[t + 1]) for t in range(1, 13)])
    assert frozen_psnr > source_psnr


def test_warp_error_every_nth_pair_within_scenes():
    frames, scenes = footage()
    meter = _scores(frames, scenes, frames, every=4)
    # pairs (t, t+1) at 0, 4, 8, 12 frames into each scene, t+1 still inside it
    assert {k: s.pairs for k, s in meter.scenes().items()} == {0: 4, 1: 3}
    full = _scores(frames, scenes, frames)
    assert meter.overall().source == pytest.approx(
        np.mean([warp_error(frames[t], frames[t + 1], FlowEstimator()(grey(frames[t]), grey(frames[t + 1])))
                 for t in (0, 4, 8, 12, 14, 18, 22)]), rel=1e-6)
    assert full.overall().pairs == 24


def test_background_meter_gives_the_same_figures():
    frames, scenes = footage()
    here = _scores(frames, scenes, frames[::-1])
    away = WarpMeter(background=True)
    for k, (a, b) in enumerate(scenes):
        for t in range(a, b):
            away.add(k, frames[t], frames[::-1][t])
    away.finish()
    assert away.overall() == here.overall()


def occluder_clip(n=10, size=(192, 108), step=6, side=36):
    """A textured square (a patch of another photo) sliding right over a slowly moving shot.
    Returns the frames and the square's mask in each."""
    w, h = size
    background = render_move(Move("astronaut", n, (0.45, 0.45, 0.9), (0.5, 0.45, 0.85)), size)
    patch = cv2.resize(photo("chelsea")[100:300, 150:350], (side, side), interpolation=cv2.INTER_AREA)
    frames, masks = [], []
    for t, f in enumerate(background):
        x0, y0 = 30 + step * t, (h - side) // 2
        f = f.copy()
        f[y0:y0 + side, x0:x0 + side] = patch
        m = np.zeros((h, w), bool)
        m[y0:y0 + side, x0:x0 + side] = True
        frames.append(f)
        masks.append(m)
    return frames, masks


def test_occlusion_check_masks_what_the_moving_object_covers():
    frames, masks = occluder_clip()
    estimate = FlowEstimator()
    covered_masked, far_masked, with_mask, without_mask = [], [], [], []
    for t in range(len(frames) - 1):
        flow = estimate(grey(frames[t]), grey(frames[t + 1]))
        # background at t that the square hides at t+1: nothing in t+1 matches it
        covered = masks[t + 1] & ~masks[t]
        near = cv2.dilate((masks[t] | masks[t + 1]).astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool)
        covered_masked.append(1 - flow.keep[covered].mean())
        far_masked.append(1 - flow.keep[~near].mean())
        with_mask.append(warp_error(frames[t], frames[t + 1], flow))
        without_mask.append(warp_error(frames[t], frames[t + 1], PairFlow(flow.map_x, flow.map_y, np.ones_like(flow.keep))))
    assert np.mean(covered_masked) > 0.6
    assert np.mean(far_masked) < 0.1
    assert np.mean(with_mask) < 0.7 * np.mean(without_mask)


# -- evaluate --------------------------------------------------------------------------------

def test_evaluate_json_csv_every_and_progress(videos, models, tmp_path):
    seen = []
    ev = evaluate(videos["source"], [videos["source"], videos["flicker"]], prompt="a cinematic film still",
                  models=models, every=3, progress=lambda done, total, msg: seen.append((done, total)))
    assert [(s.start, s.end) for s in ev.scenes] == [(0, 14), (14, 26)]
    assert seen[-1] == (26, 26)
    same, flicker = ev.renders
    # pairs at 0, 3, 6, 9 (and 12, whose t+1 = 13 is still in scene 0) / 0, 3, 6, 9 into scene 1
    assert [f.pairs for f in same.scenes] == [5, 4] and same.overall.pairs == 9
    assert [f.frames for f in same.scenes] == [5, 4]
    o = same.overall
    assert o.warp_error == pytest.approx(o.source_warp_error) and o.psnr_delta == pytest.approx(0)
    assert o.dino == pytest.approx(1, abs=1e-5) and o.content_similarity == pytest.approx(1, abs=1e-5)
    assert o.clip_consistency == pytest.approx(o.source_clip_consistency)
    assert flicker.overall.warp_error_delta > 0 and flicker.overall.psnr_delta < 0
    data = to_json(ev)
    json.dumps(data, allow_nan=False)
    assert data["models"] == {role: getattr(models.spec, role) for role in ("captioner", "sentence", "dino", "clip")}
    r = data["renders"][1]
    assert r["path"] == str(videos["flicker"]) and r["prompt"] == "a cinematic film still"
    for key in ("warp_error", "psnr_delta", "tssim_delta", "clip_consistency", "content_similarity", "dino", "clip_t"):
        assert isinstance(r[key], float), key
        assert all(key in row for row in r["scenes"])
    assert data["every"] == 3 and len(r["scenes"]) == 2
    rows = to_csv(ev).splitlines()
    assert rows[0].split(",") == list(COLUMNS) and len(rows) == 1 + 2 * 3
    out = write_json(ev, tmp_path / "eval.json")
    assert json.loads(out.read_text())["renders"][0]["warp_error_delta"] == pytest.approx(0)


@pytest.mark.parametrize("render, needle", [("short", "25 frames, the source source.mp4 has 26"),
                                            ("slow", "20.000 fps, the source source.mp4 24.000"),
                                            ("late", "frame 10 is shown at 0.438s, the source's at 0.417s")])
def test_renders_with_other_frames_or_timing_are_refused(videos, render, needle):
    with pytest.raises(InputFileError) as ex:
        evaluate(videos["source"], [videos["flicker"], videos[render]], models=None)
    msg = str(ex.value)
    assert needle in msg and str(videos[render]) in msg and "\n" not in msg


def test_without_weights_the_weight_free_measures_run_with_a_note(videos):
    ev = evaluate(videos["source"], [videos["flicker"]], models=EvalModelSpec())  # offline, empty cache
    o = ev.renders[0].overall
    assert o.warp_error > o.source_warp_error and o.psnr_delta is not None and o.tssim_delta is not None
    assert o.clip_consistency is o.content_similarity is o.dino is o.clip_t is None
    assert ev.models == ()
    (note,) = ev.notes
    for needle in ("content similarity needs nlpconnect/vit-gpt2-image-captioning and "
                   "sentence-transformers/all-MiniLM-L6-v2", "DINO needs facebook/dino-vits16",
                   "CLIP consistency/CLIP-T needs openai/clip-vit-large-patch14", "huggingface-cli download",
                   "[models.eval]"):
        assert needle in note
    assert "\n" not in note


def test_default_models_come_from_the_hugging_face_cache(tiny_eval, videos, tmp_path, monkeypatch):
    """A default id found in the cache (as `huggingface-cli download` leaves it) loads offline."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "models--facebook--dino-vits16" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_eval["dino"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    ev = evaluate(videos["source"], [videos["flicker"]], models=EvalModelSpec(), every=13)
    assert ev.models == (("dino", "facebook/dino-vits16"),)
    assert 0 < ev.renders[0].overall.dino <= 1 and ev.renders[0].overall.clip_t is None
    assert "DINO" not in ev.notes[0] and "openai/clip-vit-large-patch14" in ev.notes[0]


def test_a_named_model_that_is_missing_is_an_error(videos, tmp_path):
    with pytest.raises(ModelError) as ex:
        evaluate(videos["source"], [videos["flicker"]], models=EvalModelSpec(clip=str(tmp_path / "nowhere")))
    assert "clip" in str(ex.value) and "nowhere" in str(ex.value)


def test_prompt_comes_from_the_render_report(videos, models, tmp_path):
    from cinefx.presets import load_preset, prompt_text

    recorded, named, elsewhere = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    recorded.write_text(json.dumps({"preset": "noir", "prompt": "a rainy street at night"}))
    named.write_text(json.dumps({"preset": "epic"}))
    elsewhere.write_text(json.dumps({"preset": "a-look-from-another-machine"}))
    ev = evaluate(videos["source"], [videos["flicker"]] * 3, reports=[recorded, named, elsewhere],
                  models=models, every=8)
    assert [r.prompt for r in ev.renders] == ["a rainy street at night", prompt_text(load_preset("epic")), None]
    assert ev.renders[0].overall.clip_t != ev.renders[1].overall.clip_t
    assert ev.renders[2].overall.clip_t is None and ev.renders[2].overall.dino is not None
    assert ev.notes == ("no CLIP-T for flicker.mp4: give a prompt, or the report JSON of the run that made it "
                        "(which names its preset)",)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputFileError):
        evaluate(videos["source"], [videos["flicker"]], reports=[tmp_path / "bad.json"], models=None)


# -- models against their references ---------------------------------------------------------

def test_clip_t_and_dino_equal_transformers_computed_directly(tiny_eval, spec, models, tmp_path):
    import torch
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor, ViTModel

    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    images = {}
    for i, (name, move) in enumerate([("astronaut", (0.4, 0.4, 0.8)), ("coffee", (0.5, 0.5, 0.9))]):
        img = next(render_move(Move(name, 1, move, move), (96, 64)))
        images[f"{i}.png"] = img
        cv2.imwrite(str(gen / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    real = next(render_move(Move("astronaut", 1, (0.5, 0.45, 0.7), (0.5, 0.45, 0.7)), (80, 80)))
    cv2.imwrite(str(ref / "real.jpg"), cv2.cvtColor(real, cv2.COLOR_RGB2BGR))
    real = cv2.cvtColor(cv2.imread(str(ref / "real.jpg")), cv2.COLOR_BGR2RGB)  # as decoded, JPEG losses included
    (tmp_path / "prompts.jsonl").write_text(
        '{"file_name": "0.png", "text": "an astronaut, film still"}\n{"file_name": "1.png", "text": "coffee"}\n')
    ev = evaluate_stills(gen, ref, tmp_path / "prompts.jsonl", models=models)
    assert [s.prompt for s in ev.images] == ["an astronaut, film still", "coffee"]

    clip = CLIPModel.from_pretrained(tiny_eval["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_eval["clip"])
    dino = ViTModel.from_pretrained(tiny_eval["dino"], add_pooling_layer=False).eval()
    dproc = AutoImageProcessor.from_pretrained(tiny_eval["dino"])
    cos = torch.nn.functional.cosine_similarity
    with torch.no_grad():
        for s in ev.images:
            enc = proc(text=[s.prompt], images=[images[s.path.name]], return_tensors="pt", padding=True)
            img, txt = clip.get_image_features(pixel_values=enc["pixel_values"]), clip.get_text_features(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            img, txt = (x if torch.is_tensor(x) else x.pooler_output for x in (img, txt))
            assert s.clip_t == pytest.approx(cos(img, txt).item(), abs=1e-5)
            a, b = (dino(**dproc(images=[x], return_tensors="pt")).last_hidden_state[:, 0]
                    for x in (images[s.path.name], real))
            assert s.dino == pytest.approx(cos(a, b).item(), abs=1e-5)
    assert ev.clip_t == pytest.approx(np.mean([s.clip_t for s in ev.images]))
    saved = json.loads(write_stills_json(ev, tmp_path / "stills.json").read_text())
    assert saved["dino"] == pytest.approx(ev.dino) and [i["clip_t"] for i in saved["images"]] == [s.clip_t for s in ev.images]
    assert dict(ev.models) == {"clip": spec.clip, "dino": spec.dino}


def test_sentence_embedding_is_minilm_mean_pooling(tiny_eval, models):
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = ["a man sitting on a red table", "a cat", "the street at night with light"]
    ours = models.embed_sentences(texts)
    # the model card's recipe: mean of token embeddings over the attention mask, then normalised
    tok, bert = AutoTokenizer.from_pretrained(tiny_eval["sentence"]), AutoModel.from_pretrained(tiny_eval["sentence"])
    with torch.no_grad():
        enc = tok(texts, padding=True, return_tensors="pt")
        h = bert(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        ref = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return  # the recipe above is what sentence-transformers applies (Pooling mean + Normalize)
    st = SentenceTransformer(str(tiny_eval["sentence"]), device="cpu")
    np.testing.assert_allclose(ours, st.encode(texts), atol=1e-5)


def test_caption_images_is_greedy_generation_of_16_tokens(tiny_eval, models, tmp_path):
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, VisionEncoderDecoderModel

    paths = []
    for i, name in enumerate(("astronaut", "rocket")):
        paths.append(tmp_path / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(photo(name)[:200, :300], cv2.COLOR_RGB2BGR))
    captions = caption_images(paths, str(tiny_eval["captioner"]))
    assert captions == caption_images(paths, models)
    model = VisionEncoderDecoderModel.from_pretrained(tiny_eval["captioner"]).eval()
    tok, proc = AutoTokenizer.from_pretrained(tiny_eval["captioner"]), AutoImageProcessor.from_pretrained(tiny_eval["captioner"])
    rgb = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    with torch.no_grad():
        ids = model.generate(pixel_values=proc(images=rgb, return_tensors="pt").pixel_values, max_new_tokens=16,
                             do_sample=False, num_beams=1)
    assert ids.shape[1] == 17  # the start token and 16 new ones: the tiny decoder never says EOS
    assert captions == [c.strip() for c in tok.batch_decode(ids, skip_special_tokens=True)]
    assert all(captions)
    with pytest.raises(InputFileError):
        (tmp_path / "x.png").write_bytes(b"not an image")
        caption_images([tmp_path / "x.png"], models)


def test_pickled_weights_need_allow_pickle(tiny_eval, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "dino-bin"  # the same model as a pickle, as older hub repos ship it
    shutil.copytree(tiny_eval["dino"], folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError) as ex:
        EvalModels(EvalModelSpec(dino=str(folder)), ("dino",))
    assert "only pickled weights" in str(ex.value) and "--allow-pickle" in str(ex.value)
    assert "\n" not in str(ex.value)
    assert isinstance(ex.value, CinefxError)
    m = EvalModels(EvalModelSpec(dino=str(folder), allow_pickle=True), ("dino",))
    assert m.embed_dino([np.zeros((40, 40, 3), np.uint8)]).shape == (1, 32)


def test_a_damaged_model_is_one_line(tiny_eval, tmp_path):
    import shutil

    folder = tmp_path / "clip-cut"
    shutil.copytree(tiny_eval["clip"], folder)
    (folder / "model.safetensors").write_bytes((tiny_eval["clip"] / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ModelError) as ex:
        EvalModels(EvalModelSpec(clip=str(folder)), ("clip",))
    assert str(ex.value).startswith(f"clip model {str(folder)!r}: cannot be loaded (") and "\n" not in str(ex.value)


@pytest.mark.parametrize("role,cls", [("clip", EvalModelSpec), ("captioner", EvalModelSpec)])
def test_a_weight_file_short_of_tensors_is_refused_not_filled_with_random_values(tiny_eval, tmp_path, role, cls):
    """transformers fills the tensors a file lacks with random values and only logs it (which
    cinefx silences): CLIP scores from a half-random model. Now one line names the file and a
    tensor, as for the renderer's models."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / f"{role}-short"
    shutil.copytree(tiny_eval[role], folder)
    tensors = load_file(folder / "model.safetensors")
    gone = sorted(tensors)[len(tensors) // 2]
    del tensors[gone]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError) as ex:
        EvalModels(cls(**{role: str(folder)}), (role,))
    assert str(ex.value).startswith(f"{role} {str(folder)!r}: model.safetensors lacks 1 tensor the model needs (")
    assert "download or export the model again" in str(ex.value) and "\n" not in str(ex.value)
