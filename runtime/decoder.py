"""`PidDecoder`: an exported PiD decoder in place of a diffusers pipeline's `vae.decode`.

    latents = pipe(prompt, height=1024, width=1024, output_type="latent").images
    decoder = PidDecoder.from_export("engines/PiD_res2kto4k_sr4x_official_flux_distill_4step-bf16")
    images = decoder.decode(latents, prompt=prompt, height=1024, width=1024)   # list of 4096x4096 PIL images

The model (TensorRT engine or ONNX Runtime session) is opened once and reused by every
`decode`; a TensorRT backend keeps its buffers while the shapes stay the same. Latents
are taken as the pipeline returns them (`pid_runtime.latents.from_pipeline`) and
intermediate ones are moved into PiD's training frame (`to_training_frame`), so
`sigma` is the pipeline scheduler's sigma of that latent. A decode here equals
`pid-run MODEL LATENTS --pipeline BACKBONE --ldm-size HxW` with the same seed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .backends import Backend, open_backend, preflight
from .batching import DecodeRequest, Outcome, check_request, decode_many
from .caption import find_empty_caption, load_encoder, default_caption_model, resolve_caption
from .decode import DecodeTimings, decode
from .decode_args import check_decode_args
from .io import pixel_rows
from .latents import LatentError, check_backbone_fits, from_pipeline, to_training_frame
from .sampler import MAX_STEPS
from .tiling import TileSetting

OUTPUT_TYPES = ("pil", "pt", "np")


class PidDecoder:
    """Decode LDM latents to images with one exported PiD network (see the module docstring)."""

    def __init__(self, backend: Backend, model_path: str | os.PathLike[str], backbone: str | None = None,
                 caption_model: str | os.PathLike[str] | None = None,
                 notify: Callable[[str], None] | None = None):
        self.backend = backend
        self.model_path = Path(model_path)
        self.caption_model = caption_model
        self.notify = notify or (lambda message: None)
        self.backbone = backbone or backend.meta.backbone  # the export's own, when it records one
        if self.backbone is not None:
            check_backbone_fits(backend.meta, self.backbone)
        self.last_timings: DecodeTimings | None = None
        self._encoder: Any = None  # the caption encoder, loaded by the first prompt and kept
        self._empty_caption: Tensor | None = None

    @classmethod
    def from_export(cls, path: str | os.PathLike[str], device: str | torch.device | None = "auto",
                    backbone: str | None = None, cuda_graph: bool = False,
                    caption_model: str | os.PathLike[str] | None = None,
                    notify: Callable[[str], None] | None = None, trt: str | None = None,
                    threads: int | None = None) -> "PidDecoder":
        """Open an export directory, engine (.plan/.engine) or .onnx as `pid-run` does.

        `backbone`: the LDM whose latents it decodes (default: the export's release);
        needed for custom exports given packed latents. `caption_model`: Gemma-2
        encoder for `prompt=` (default $PID_CAPTION_MODEL, else the hub model).
        `trt`: "tensorrt" | "rtx" for an engine (default: $PID_TRT, else the library that
        built it). `notify` receives notes, e.g. why a directory's engine is not used here.
        `threads`: ONNX Runtime's intra-op threads (e.g. a serving replica's share of the cores).
        """
        model_path = preflight(path, trt, note=notify, device=device)
        backend = open_backend(model_path, device=device, cuda_graph=cuda_graph, trt=trt, log=notify, threads=threads)
        try:
            return cls(backend, model_path, backbone=backbone, caption_model=caption_model, notify=notify)
        except BaseException:
            backend.close()
            raise

    @property
    def meta(self):
        return self.backend.meta

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def network_latents(self, latents: Tensor | np.ndarray, backbone: str | None = None,
                        height: int | None = None, width: int | None = None,
                        bn_stats: Any = None) -> tuple[Tensor, str | None]:
        """The pipeline latents in the network's [B,C,h,w] layout, and the backbone used (None: taken as is)."""
        name = backbone or self.backbone
        if name is None:
            lq = torch.as_tensor(latents)
            if lq.ndim != 4:
                model = self.meta.release or "a custom network"
                raise LatentError(f"latents of shape {list(lq.shape)}: this export ({model}) does not say which "
                                  "LDM made them, so pass backbone=... to unpack them")
            return lq.to(torch.float32), None
        if backbone is not None:
            check_backbone_fits(self.meta, name)
        return from_pipeline(latents, name, height=height, width=width, bn_stats=bn_stats), name

    def caption(self, batch: int, prompt: str | Sequence[str] | None = None,
                caption_embeds: Tensor | np.ndarray | None = None) -> Tensor:
        """Caption embeddings [batch or 1, tokens, dim]: as given, encoded from the prompt(s), else the
        export's unconditional (empty) caption."""
        if prompt is not None and caption_embeds is not None:
            raise ValueError("give either prompt or caption_embeds, not both")
        if caption_embeds is not None:
            embeds = torch.as_tensor(caption_embeds).to("cpu", torch.float32)
            return embeds[None] if embeds.ndim == 2 else embeds
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if prompts and self._encoder is None:
            model = self.caption_model or default_caption_model()
            self.notify(f"loading the caption encoder {model}")
            self._encoder = load_encoder(model, device=self.device)
        return resolve_caption(batch, self.model_path, prompts, encoder=self._encoder, notify=self.notify)

    def decode(self, latents: Tensor | np.ndarray, prompt: str | Sequence[str] | None = None,
               caption_embeds: Tensor | np.ndarray | None = None, sigma: float | Sequence[float] | Tensor = 0.0,
               seed: int | None = 0, backbone: str | None = None, height: int | None = None,
               width: int | None = None, bn_stats: Any = None, steps: int = MAX_STEPS,
               batch_size: int | None = None, output_type: str = "pil", size: tuple[int, int] | None = None,
               seeds: Sequence[int] | None = None, tile: TileSetting = "auto", max_memory: float | None = None) -> Any:
        """Decode a pipeline's latents (as `output_type="latent"` returns them) to images.

        `height`, `width`: the pipeline's image size (needed for packed latents).
        `sigma`: the scheduler's sigma of the latent (0 for the final one; per item allowed).
        `bn_stats`: for Flux2-Klein's raw latent, `pipe.vae` or a BatchNormStats.
        `size`: output (height, width) in pixels, as `pid-run --size` (default: the latent's native size).
        `tile`: "auto" | (h, w) | (h, w, overlap) | None, and `max_memory` (GiB), as `pid-run --tile`,
        `--max-memory` (pid_runtime.tiling).
        No prompt and no caption_embeds: the export's unconditional (empty) caption.
        `seeds`: one seed per item, each item's noise its own (as if decoded alone with that seed),
        so an item's image does not depend on its batch-mates; else `seed` is the whole batch's.
        Returns, like diffusers' image processors: "pil" a list of PIL images,
        "pt" float32 [B,3,H,W] in [0,1], "np" float32 [B,H,W,3] in [0,1].
        """
        size = check_decode_args(latents, prompt, caption_embeds, sigma, seed, height, width, steps, batch_size,
                                 output_type, size, OUTPUT_TYPES)
        seed = None if seed is None else int(seed)  # numpy integers too
        lq, name = self.network_latents(latents, backbone, height, width, bn_stats)
        if name is not None:
            lq, sigma = to_training_frame(lq, sigma, name)
        caption = self.caption(lq.shape[0], prompt, caption_embeds)
        if caption.shape[-2] > self.meta.txt_max_length:
            self.notify(f"note: the caption has {caption.shape[-2]} tokens; this model reads the first "
                        f"{self.meta.txt_max_length}, the last {caption.shape[-2] - self.meta.txt_max_length} are cut")
        result = decode(self.backend, lq, caption, sigma, seed=seed, steps=steps, batch_size=batch_size, size=size,
                        seeds=seeds, tile=tile, max_memory=max_memory, on_plan=lambda plan: self.notify(plan.describe()))
        self.last_timings = result.timings
        return postprocess(result.images, output_type)

    def unconditional_caption(self) -> Tensor | None:
        """The export's empty caption [1,L,D] (what a request without caption embeddings gets);
        None when the export has none. Read once."""
        if self._empty_caption is None and find_empty_caption(self.model_path) is not None:
            self._empty_caption = self.caption(1)[:1].contiguous()
        return self._empty_caption

    def check_request(self, request: DecodeRequest) -> None:
        """Cheap validation of one request (network layout) before any work; DecodeError says why."""
        check_request(self.backend, request, self.unconditional_caption())

    def decode_many(self, requests: Sequence[DecodeRequest], max_batch: int | None = None) -> list[Outcome]:
        """Decode requests of any shapes, batched where they fit (`pid_runtime.batching.decode_many`):
        one Outcome per request, in order; a bad request gets its error, the others their images."""
        return decode_many(self.backend, requests, self.unconditional_caption(), max_batch)

    def close(self) -> None:
        """Release the model and the caption encoder."""
        self.backend.close()
        self._encoder = None

    def __enter__(self) -> "PidDecoder":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def postprocess(sample: Tensor, output_type: str = "pil") -> Any:
    """The decoded sample [B,3,H,W] in [-1,1] as diffusers' image processors return images."""
    if output_type == "pil":
        from PIL import Image

        # The pixels pid-run writes to a PNG.
        return [Image.fromarray(pixel_rows(item, 8, slice(None))) for item in sample]
    images = (sample.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) / 2
    return images if output_type == "pt" else images.permute(0, 2, 3, 1).numpy()


__all__ = ["OUTPUT_TYPES", "PidDecoder", "postprocess"]
