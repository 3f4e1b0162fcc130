"""Segment Anything for face masks: checkpoint loading (model type inferred from its weights) and batched,
prompted inference (the image encoder runs once per batch on the device, bf16 on CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cushing.devices import autocast_for, pick_device

__all__ = ["SamMasker", "infer_model_type", "build_sam", "load_sam", "SamPrompt"]

KNOWN = {(1280, 32): "vit_h", (1024, 24): "vit_l", (768, 12): "vit_b"}


def _state(path: str | Path) -> dict:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or "image_encoder.patch_embed.proj.weight" not in sd:
        raise ValueError(f"{path}: not a Segment Anything checkpoint (no image_encoder.patch_embed.proj.weight)")
    return sd


def _architecture(sd: dict) -> dict:
    """Encoder width, depth, heads and global-attention blocks, read from the weights themselves."""
    dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
    blocks = sorted({int(k.split(".")[2]) for k in sd if k.startswith("image_encoder.blocks.")})
    head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
    grid = 1024 // 16  # global-attention blocks hold relative positions over the whole 64x64 token grid
    global_idx = [i for i in blocks if sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * grid - 1]
    return {"encoder_embed_dim": dim, "encoder_depth": len(blocks), "encoder_num_heads": dim // head_dim,
            "encoder_global_attn_indexes": global_idx}


def _known(arch: dict) -> str:
    return KNOWN.get((arch["encoder_embed_dim"], arch["encoder_depth"]), "custom")


def infer_model_type(path: str | Path) -> str:
    return _known(_architecture(_state(path)))


def build_sam(encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
              encoder_global_attn_indexes: list[int]):
    """SAM with an encoder of any size and random weights, built as segment_anything's registry builds vit_h / l / b
    (from its public modules: the registry takes no other size)."""
    try:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    except ImportError as e:  # pragma: no cover - pinned dependency
        raise ImportError("SAM masks need `segment-anything` (pip install segment-anything==1.0)") from e

    encoder = ImageEncoderViT(depth=encoder_depth, embed_dim=encoder_embed_dim, img_size=1024, mlp_ratio=4,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder_num_heads,
                              patch_size=16, qkv_bias=True, use_rel_pos=True, window_size=14, out_chans=256,
                              global_attn_indexes=encoder_global_attn_indexes)
    prompts = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                            mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return Sam(encoder, prompts, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


def load_sam(path: str | Path, model_type: str | None = None, device: str | torch.device = "cpu"):
    """Build SAM for a checkpoint (vit_h / vit_l / vit_b, or any size: the architecture is read from the file)."""
    sd = _state(path)
    arch = _architecture(sd)
    inferred = _known(arch)
    if model_type and model_type != "auto" and model_type != inferred:
        raise ValueError(f"{path}: --sam-model-type {model_type} given, but the weights are {inferred} "
                         f"(width {arch['encoder_embed_dim']}, depth {arch['encoder_depth']})")
    sam = build_sam(**arch)
    sam.load_state_dict(sd)
    return sam.to(device).eval(), inferred


@dataclass
class SamPrompt:
    points: np.ndarray  # [K, 2] x, y in image pixels; all positive
    box: np.ndarray  # [4] x0, y0, x1, y1


class SamMasker:
    """Masks for many images: encoder batched on the device, prompts decoded per image."""

    def __init__(self, checkpoint: str | Path, model_type: str | None = None, device: str = "auto",
                 batch: int = 8):
        self.device = pick_device(device)
        self.sam, self.model_type = load_sam(checkpoint, model_type, self.device)
        from segment_anything.utils.transforms import ResizeLongestSide

        self.transform = ResizeLongestSide(self.sam.image_encoder.img_size)
        self.batch = batch

    @torch.no_grad()
    def _embed(self, images: list[np.ndarray]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        xs, sizes = [], []
        for img in images:
            x = self.transform.apply_image(img)
            sizes.append(x.shape[:2])
            t = torch.as_tensor(x, device=self.device).permute(2, 0, 1).float()
            xs.append(self.sam.preprocess(t[None])[0])
        with autocast_for(self.device):
            emb = self.sam.image_encoder(torch.stack(xs))
        return emb.float(), sizes

    @torch.no_grad()
    def masks(self, images: list[np.ndarray], prompts: list[SamPrompt]) -> list[tuple[np.ndarray, float]]:
        """(boolean mask at the image's size, predicted IoU score) per image."""
        out = []
        for i in range(0, len(images), self.batch):
            emb, sizes = self._embed(images[i:i + self.batch])
            for j, (img, prompt) in enumerate(zip(images[i:i + self.batch], prompts[i:i + self.batch])):
                out.append(self._decode(emb[j:j + 1], sizes[j], img.shape[:2], prompt))
        return out

    def _decode(self, emb: torch.Tensor, input_size, original_size, prompt: SamPrompt) -> tuple[np.ndarray, float]:
        pts = self.transform.apply_coords(prompt.points.astype(np.float64), original_size)
        box = self.transform.apply_boxes(prompt.box[None].astype(np.float64), original_size)
        coords = torch.as_tensor(pts, dtype=torch.float, device=self.device)[None]
        labels = torch.ones((1, len(pts)), dtype=torch.int, device=self.device)
        sparse, dense = self.sam.prompt_encoder(points=(coords, labels),
                                                boxes=torch.as_tensor(box, dtype=torch.float, device=self.device),
                                                masks=None)
        low, iou = self.sam.mask_decoder(image_embeddings=emb, image_pe=self.sam.prompt_encoder.get_dense_pe(),
                                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                         multimask_output=True)
        masks = self.sam.postprocess_masks(low, input_size, original_size) > self.sam.mask_threshold
        best = int(iou[0].argmax())
        return masks[0, best].cpu().numpy(), float(iou[0, best])
