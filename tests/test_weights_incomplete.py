"""A model folder whose weight file lacks tensors the model needs fails at load, in one line naming
the file and the tensors, whichever library loads it: transformers fills what a file lacks with
random values and only logs it (silenced), so a text encoder short of a layer rendered garbage
as if nothing were wrong; diffusers failed on a meta tensor without naming the file or tensor."""

import shutil

import pytest
import torch

from cinefx.diffusion.models import ModelSpec, load_components
from cinefx.errors import ModelError

TE = "text_encoder/model.safetensors"


def _rewrite(path, edit):
    """Write the safetensors file `path` again with its tensors passed through `edit` (dict → dict)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), path, metadata=meta)


def _published(tensors):
    """The text encoder as SD1.5's published file holds it: keys under ``text_model.``, the
    position_ids buffer stored (transformers saved it before 4.31), and a key the class does not use."""
    out = {f"text_model.{k}": v for k, v in tensors.items()}
    out["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    out["logit_scale"] = torch.tensor(2.6592)
    return out


def _without(*names, published=False):
    def edit(tensors):
        tensors = _published(tensors) if published else dict(tensors)
        for name in names:
            del tensors[name]
        return tensors
    return edit


def _edited(tiny_bundle, tmp_path, file, edit):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _rewrite(bundle / file, edit)
    return bundle


CASES = {  # file, edit, controls, what the message says
    "text-encoder": (TE, _without("encoder.layers.1.mlp.fc2.weight", "encoder.layers.1.mlp.fc2.bias",
                                  "final_layer_norm.weight"), (),
                     ["base ", f"{TE} lacks 3 tensors",  # two named, the rest left out
                      "(encoder.layers.1.mlp.fc2.bias, encoder.layers.1.mlp.fc2.weight, …)"]),
    "text-encoder-published": (TE, _without("text_model.encoder.layers.0.self_attn.q_proj.weight", published=True),
                               (), ["base ", f"{TE} lacks 1 tensor ", "encoder.layers.0.self_attn.q_proj.weight"]),
    "depth-estimator": ("depth-estimator/model.safetensors",
                        _without("dpt.encoder.layer.0.attention.attention.key.weight"), ("depth",),
                        ["depth-estimator ", "/depth-estimator': model.safetensors lacks 1 tensor ",
                         "dpt.encoder.layer.0.attention.attention.key.weight"]),
    "unet": ("unet/diffusion_pytorch_model.safetensors", _without("conv_in.weight"), (),
             ["base ", "unet/diffusion_pytorch_model.safetensors lacks 1 tensor ", "conv_in.weight"]),
    "controlnet": ("controlnet-canny/diffusion_pytorch_model.safetensors",
                   _without("controlnet_cond_embedding.conv_in.weight"), ("canny",),
                   ["controlnet-canny ", "diffusion_pytorch_model.safetensors lacks 1 tensor ",
                    "controlnet_cond_embedding.conv_in.weight"]),
}


@pytest.mark.parametrize("case", CASES)
def test_missing_tensors_fail_at_load_in_one_line(tiny_bundle, tmp_path, capfd, case):
    file, edit, controls, needles = CASES[case]
    bundle = _edited(tiny_bundle, tmp_path, file, edit)
    capfd.readouterr()
    with pytest.raises(ModelError) as err:
        load_components(ModelSpec(base=str(bundle)), controls, "cpu", torch.float32)
    msg = str(err.value)
    assert msg.startswith(needles[0]) and all(n in msg for n in needles[1:]), msg
    assert "download or export the model again" in msg and "\n" not in msg and len(msg) < 400, msg
    assert capfd.readouterr() == ("", "")  # not the libraries' report of the same


@pytest.mark.parametrize("layout", ["saved", "published"])
def test_complete_text_encoder_encodes_as_transformers_does(tiny_bundle, tmp_path, layout):
    """A complete file loads, stored buffers and keys the class does not use included, and encodes
    a prompt as transformers' own loader of the folder does."""
    from transformers import CLIPTextModel

    bundle = _edited(tiny_bundle, tmp_path, TE, _published) if layout == "published" else tiny_bundle
    host = load_components(ModelSpec(base=str(bundle)), (), "cpu", torch.float32).host
    ids = host.tokenizer(["a cinematic film still of the golden hour"], padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    reference, info = CLIPTextModel.from_pretrained(bundle / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"]
    with torch.no_grad():
        assert torch.equal(host.text_encoder(ids)[0], reference(ids)[0])
