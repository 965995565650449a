"""Images: Image features or pixel arrays, as float [channels, image_size, image_size] per row."""

from __future__ import annotations

import math
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from adaptflow.errors import StudyError
from adaptflow.spec import DataSpec
from tasks.modalities.base import LISTS, REGISTRY, Modality, Normaliser, progress

LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601-2, as PIL converts RGB to L


@REGISTRY.register("image")
class Image(Modality):
    def claims(self, feature: Any) -> bool:
        """Image features, 2-D/3-D arrays and nested lists (flat pixel lists need data.modality: image)."""
        if isinstance(feature, datasets.Image | datasets.Array2D | datasets.Array3D):
            return True
        return isinstance(feature, LISTS) and isinstance(feature.feature, LISTS)

    def tensor(self, table: datasets.Dataset, column: str, data: DataSpec) -> torch.Tensor:
        """Float [rows, channels, size, size], in [0, 1] for 8-bit data.

        Image files are decoded in the spec's mode; pixel arrays may be flat (a square image,
        gray or RGB), HxW or HxWxC. Mixed sizes and modes are converted row by row.
        """
        size, channels = data.image_size, data.channels
        feature = table.features[column]
        if isinstance(feature, datasets.Image):
            table = table.cast_column(column, datasets.Image(mode="L" if channels == 1 else "RGB"))
        scale = 255.0 if isinstance(feature, datasets.Image) or _integer_pixels(feature) else 1.0
        images = (
            image for batch in table.with_format("numpy").iter(batch_size=1000) for image in batch[column]
        )
        out = torch.empty(len(table), channels, size, size)
        for i, image in enumerate(progress(images, "converting images", len(table))):
            pixels = torch.as_tensor(np.asarray(image, dtype=np.float32)) / scale
            out[i] = _resize(_channels_first(pixels, channels, column), size)
        return out

    def normaliser(self, reference: torch.Tensor, data: DataSpec) -> Normaliser:
        """Per channel."""
        mean = reference.mean((0, 2, 3), keepdim=True)
        std = reference.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
        return lambda x: (x - mean) / std


def _integer_pixels(feature: Any) -> bool:
    while isinstance(feature, LISTS):
        feature = feature.feature
    return "int" in feature.dtype  # Value and Array2D/3D both name their dtype


def _channels_first(pixels: torch.Tensor, channels: int, column: str) -> torch.Tensor:
    """One image as [channels, H, W]: flat square lists reshaped, alpha dropped, gray <-> RGB."""
    if pixels.dim() == 1:
        for depth in (1, 3):
            side = math.isqrt(len(pixels) // depth)
            if side * side * depth == len(pixels):
                pixels = pixels.view(side, side, depth)
                break
        else:
            raise StudyError(
                f"column {column!r} holds a flat pixel list of length {len(pixels)}, which is not a square "
                "gray or RGB image; store images as HxW / HxWxC arrays or as an Image feature."
            )
    if pixels.dim() == 2:
        pixels = pixels.unsqueeze(-1)
    pixels = (pixels[..., :1] if pixels.shape[-1] == 2 else pixels[..., :3]).permute(2, 0, 1)  # no alpha
    if pixels.shape[0] == channels:
        return pixels
    if channels == 1:
        return (pixels * LUMA.view(3, 1, 1)).sum(0, keepdim=True)
    return pixels.expand(3, -1, -1)


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
