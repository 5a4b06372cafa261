"""Annotators from controlnet-aux (lineart, soft edges, pose, normals, straight lines), when it is
installed: ``pip install 'cinefx[aux]'``.

controlnet-aux is optional because it needs torchvision, and PyPI's Linux torchvision wheels are
CUDA builds that fail to import on machines without a GPU driver. Its annotators read the
lllyasviel/Annotators weights, which ship only as pickles (.pth), so loading them takes
``--allow-pickle`` like any other pickle (see `cinefx.diffusion.models`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

INSTALL_HINT = "pip install 'cinefx[aux]' (controlnet-aux, which needs a torchvision that imports on this machine)"


@dataclass(frozen=True)
class AuxKind:
    detector: str  # class name in controlnet_aux
    weights: str  # the file its from_pretrained reads from an annotators folder or hub repo
    controlnet: str  # the SD1.5 ControlNet trained on its maps
    options: dict = field(default_factory=dict)  # keywords for the detector's __call__


# The ControlNet 1.1 family's preprocessors, with the settings those ControlNets were trained on.
AUX_KINDS = {
    "lineart": AuxKind("LineartDetector", "sk_model.pth", "lllyasviel/control_v11p_sd15_lineart",
                       {"coarse": False}),
    "softedge": AuxKind("HEDdetector", "ControlNetHED.pth", "lllyasviel/control_v11p_sd15_softedge",
                        {"safe": False, "scribble": False}),
    "openpose": AuxKind("OpenposeDetector", "body_pose_model.pth", "lllyasviel/control_v11p_sd15_openpose",
                        {"include_body": True, "include_hand": False, "include_face": False}),
    "normal": AuxKind("NormalBaeDetector", "scannet.pt", "lllyasviel/control_v11p_sd15_normalbae"),
    "mlsd": AuxKind("MLSDdetector", "mlsd_large_512_fp32.pth", "lllyasviel/control_v11p_sd15_mlsd"),
}
DEFAULT_ANNOTATORS = "lllyasviel/Annotators"


def load_annotator(kind: str, where: str, local_only: bool, device):
    """The controlnet-aux detector for `kind`, from an annotators folder or hub id, on `device`.
    Raises ImportError (controlnet-aux missing or broken) or what its loader raises."""
    import controlnet_aux

    cls = getattr(controlnet_aux, AUX_KINDS[kind].detector)
    return cls.from_pretrained(where, local_files_only=local_only).to(device)


class AnnotatorExtractor:
    """One controlnet-aux annotator as a cinefx extractor (see `cinefx.controls`).

    Annotators take one image at a time at their own detection resolution, so frames go through
    one by one at the render size (short side ≈ 512 for SD1.5, the resolution they were trained
    at) and their maps are scaled back to exactly the frame size.
    """

    def __init__(self, kind: str, device="cpu", model=None, **_):
        if model is None:
            raise ValueError(f"AnnotatorExtractor({kind!r}) needs a loaded annotator (see cinefx.diffusion.models)")
        self.kind, self.device, self.annotator = kind, device, model
        self.options = AUX_KINDS[kind].options

    def reset(self, state=None) -> None:
        pass

    def state(self):
        return None

    def __call__(self, frames: np.ndarray):
        """(F, H, W, 3) uint8 → (F, 3, H, W) float32 tensor in [0, 1]."""
        import torch

        n, h, w, _ = frames.shape
        side = min(h, w)
        maps = []
        for f in frames:
            m = np.asarray(self.annotator(f, detect_resolution=side, image_resolution=side,
                                          output_type="np", **self.options), dtype=np.uint8)
            if m.ndim == 2:
                m = np.repeat(m[..., None], 3, axis=2)
            if m.shape[:2] != (h, w):
                m = cv2.resize(m, (w, h), interpolation=cv2.INTER_LINEAR)
            maps.append(m)
        t = torch.from_numpy(np.stack(maps)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        return t.contiguous()
