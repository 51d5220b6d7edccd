"""Initial queries: whole-image boxes (fixed) and a learned content embedding."""

from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .boxes import xyxy_to_xyzr

__all__ = ["InitialQueries"]


class InitialQueries(nn.Module):
    """N queries per image: every box covers the whole image, the content is learned.

    ``init_boxes`` (N, 4) holds normalised ``(cx, cy, w, h)`` = (0.5, 0.5, 1, 1); it is a buffer,
    never trained (the official code keeps it as an embedding whose output it detaches), and is
    kept in the state dict so converted checkpoints carry it. The content is the embedding passed
    through a LayerNorm without affine weights.
    """

    def __init__(self, num_queries: int, content_dim: int):
        super().__init__()
        self.register_buffer("init_boxes", torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(num_queries, 1))
        self.content = nn.Embedding(num_queries, content_dim)

    def forward(self, image_sizes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``image_sizes`` B (h, w) -> content (B, N, D), xyzr (B, N, 4) in pixels."""
        whwh = self.init_boxes.new_tensor([[w, h, w, h] for h, w in image_sizes])[:, None]  # (B, 1, 4)
        cxcy, wh = self.init_boxes[:, :2], self.init_boxes[:, 2:]
        xyxy = torch.cat([cxcy - 0.5 * wh, cxcy + 0.5 * wh], dim=-1) * whwh
        content = F.layer_norm(self.content.weight, self.content.weight.shape[-1:])
        return content.expand(len(image_sizes), -1, -1), xyxy_to_xyzr(xyxy)
