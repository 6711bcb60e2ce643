"""A trained model as an MLflow ``pyfunc`` model: one RGB image in, the restored image out.

``mlflow.pyfunc.load_model("models:/srdiff/1").predict(img)`` restores ``img`` (a uint8 array
HxWx3) exactly as `srdiff restore` does: CLIP embeds it, the SRM refines the embedding, the UNet
samples one seeded restoration. The logged model holds the train stage's ``model.pt`` as its
artifact "model"; the code is this module of the installed ``srdiff`` package (nothing of the
repository is copied into the model). Kept light on imports: loading the model imports only this
module, MLflow and srdiff_core.
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc
import numpy as np
import torch

from srdiff_core import images
from srdiff_core.restorer import Restorer

MODEL_ARTIFACT = "model"  # the artifact key (and file artifacts/model.pt) of the model file


class RestorerModel(mlflow.pyfunc.PythonModel):
    """``model.pt`` behind MLflow's pyfunc interface.

    Input: one RGB image, a uint8 array HxWx3 (the signature). Called through
    ``unwrap_python_model().predict`` it also takes a float array in [0, 1] and answers in float.
    Output: the restored image, the input's shape (uint8 HxWx3).
    Params (signature params, per call): steps, seed, clip_x0, tile_size; their defaults are the
    evaluate settings of the config the model was trained with.
    ``model_config`` (``load_model(uri, model_config={...})``): ``device`` (auto, cpu, cuda) and
    ``clip_pretrained`` (where the CLIP weights come from, default what model.pt records; they
    must be the weights the model was trained with)."""

    # No type-hint validation (MLflow's PythonModel.__init_subclass__ checks this attribute): the
    # signature is explicit (tasks/registry.py), and without hints MLflow warns at every import.
    _skip_type_hint_validation = True

    def __init__(self, *, steps: int, seed: int, clip_x0: bool, tile_size: int, tile_overlap: int):
        self.defaults = {"steps": int(steps), "seed": int(seed), "clip_x0": bool(clip_x0), "tile_size": int(tile_size)}
        self.tile_overlap = int(tile_overlap)
        self.restorer: Restorer | None = None

    def load_context(self, context):
        config = dict(context.model_config or {})
        device = config.get("device", "auto")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.restorer = Restorer.from_file(context.artifacts[MODEL_ARTIFACT], device=device,
                                           clip_pretrained=config.get("clip_pretrained"))
        if self.restorer.conditioning != "null":
            self.restorer.encoder()  # other CLIP weights than the model's are refused at load, not per call

    def predict(self, context, model_input, params=None):  # no type hints: the signature is explicit
        if self.restorer is None:
            raise RuntimeError("the model is not loaded: use mlflow.pyfunc.load_model")
        p = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        img = np.asarray(model_input)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"expected one RGB image of shape HxWx3, got an array of shape {img.shape}")
        as_uint8 = img.dtype == np.uint8
        if as_uint8:
            lq = images.to_tensor(img)
        else:
            lq = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).permute(2, 0, 1).clamp(0, 1)
        lq_uint8 = lq.mul(255).round().to(torch.uint8)
        steps = int(p["steps"])
        if not 1 <= steps <= self.restorer.sde.T:
            raise ValueError(f"steps {steps} is outside 1..{self.restorer.sde.T}, the SDE steps this model was trained with")
        note = self.restorer.untrained_steps_note(steps)
        if note:  # as `srdiff restore --steps` warns (flows/restore.py)
            warnings.warn(f"steps {steps} {note}", stacklevel=2)
        context_vec = self.restorer.context_for([lq_uint8])
        out = self.restorer.restore(lq[None], context_vec, steps=steps, seed=int(p["seed"]),
                                    tile_size=int(p["tile_size"]), tile_overlap=self.tile_overlap,
                                    clip_x0=bool(p["clip_x0"]))[0]
        if as_uint8:
            return images.to_uint8(out)
        return out.float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
