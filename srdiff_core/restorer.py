"""Load a trained model file and restore images: the same code for evaluation and `srdiff restore`.

A model file (`model.pt`, written by the train stage) holds the EMA UNet weights, the UNet and
SDE settings, the CLIP architecture/weights spec and the SRM weights, so restoring a user's
image needs nothing precomputed: CLIP embeds the LQ, the SRM refines it, the UNet samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from srdiff_core import clip_embed, samplers, srm
from srdiff_core.config import SDEConfig, SRMConfig, UNetConfig
from srdiff_core.sde import IRSDE
from srdiff_core.unet import ConditionalUNet

MODEL_FORMAT = "srdiff-model-v1"


@dataclass
class Restorer:
    unet: ConditionalUNet
    sde: IRSDE
    srm: srm.SemanticRefinementModule
    clip_arch: str
    clip_pretrained: str
    device: torch.device
    _encoder: clip_embed.ClipEncoder | None = None

    @property
    def conditioning(self) -> str:
        return self.unet.conditioning

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu",
                  clip_pretrained: str | None = None) -> "Restorer":
        """Load `model.pt`; ``clip_pretrained`` overrides where the CLIP weights come from."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} is not an srdiff model file (format {MODEL_FORMAT}); pass the model.pt "
                             f"that the train stage wrote, or an MLflow run id of a train run")
        device = torch.device(device)
        unet = ConditionalUNet.from_config(UNetConfig.model_validate(state["unet"]))
        unet.load_state_dict(state["ema"])
        srm_state = state["srm"]
        refiner = srm.SemanticRefinementModule.from_config(srm_state["dim"], SRMConfig.model_validate(srm_state["srm"]))
        refiner.load_state_dict(srm_state["state_dict"])
        return cls(unet=unet.to(device).eval(), sde=IRSDE.from_config(SDEConfig.model_validate(state["sde"])),
                   srm=refiner.to(device).eval(), clip_arch=state["embed"]["arch"],
                   clip_pretrained=clip_pretrained or state["embed"]["pretrained"], device=device)

    def encoder(self) -> clip_embed.ClipEncoder:
        if self._encoder is None:
            self._encoder = clip_embed.load_clip(self.clip_arch, self.clip_pretrained, device=self.device)
        return self._encoder

    @torch.no_grad()
    def context_for(self, lq_uint8: list[torch.Tensor]) -> torch.Tensor:
        """RestoreCLS for LQ images (uint8 3xHxW each): CLIP embedding refined by the SRM."""
        if self.conditioning == "null":
            return torch.zeros(len(lq_uint8), self.srm.dim, device=self.device)
        emb = clip_embed.embed_batch(self.encoder(), lq_uint8).to(self.device)
        return srm.refine(self.srm, emb)

    @torch.no_grad()
    def restore(self, lq: torch.Tensor, context: torch.Tensor, *, steps: int | None, seed: int,
                tile_size: int = 0, tile_overlap: int = 32, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
        """One seeded sample per image: float [N,3,H,W] in [0,1] -> restored, same shape.

        Each image's noise comes from its own CPU generator seeded with ``seed``, so an image
        restores the same alone or in a batch, and on any device."""
        jumps = len(samplers.sampling_timesteps(self.sde.T, steps)) - 1
        per_image = [samplers.posterior_noise((1, *lq.shape[1:]), jumps, generator=torch.Generator().manual_seed(seed),
                                              device=self.device) for _ in range(lq.shape[0])]
        noise = [torch.cat(step) for step in zip(*per_image)]
        return samplers.restore(self.unet, lq.to(self.device), self.sde, context.to(self.device), steps=steps,
                                noise=noise, tile_size=tile_size, tile_overlap=tile_overlap,
                                autocast_dtype=autocast_dtype)
