"""Measures of a render against its source, beyond the stylize report's adjacent-frame PSNR and
T-SSIM (which reward stillness): flow warping error (no weights), and CLIP frame consistency,
content similarity, DINO and CLIP-T (with weights). See `measures` for the definitions.

    from cinefx.eval import evaluate
    ev = evaluate("in.mp4", ["out.mp4"], reports=["out.json"])
    ev.renders[0].overall.warp_error_delta

Importing this package imports neither torch nor transformers.
"""

from cinefx.eval.measures import Evaluation, Figures, RenderResult, StillsEvaluation, evaluate, evaluate_stills
from cinefx.eval.models import EvalModels, EvalModelSpec, caption_images
from cinefx.eval.warp import WarpMeter, WarpScene

__all__ = ["EvalModelSpec", "EvalModels", "Evaluation", "Figures", "RenderResult", "StillsEvaluation",
           "WarpMeter", "WarpScene", "caption_images", "evaluate", "evaluate_stills"]
