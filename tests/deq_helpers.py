"""Small DEQDet models and synthetic batches shared by the DEQDet tests."""

import os

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from deqdet.engine import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_CONFIG = os.path.join(ROOT, "configs", "shapes", "deqdet_r18.yaml")
TINY = [
    "MODEL.DEVICE", "cpu", "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.QUERY.NUM_QUERIES", "12", "MODEL.QUERY.CONTENT_DIM", "32", "MODEL.QUERY.FFN_DIM", "64",
    "MODEL.QUERY.FEAT_CHANNELS", "16", "MODEL.QUERY.NECK_NORM_GROUPS", "4", "MODEL.QUERY.NUM_HEADS", "2",
    "MODEL.QUERY.IN_POINTS", "4", "MODEL.QUERY.OUT_POINTS", "8",
]
NO_RAP = ["MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0", "MODEL.DEQDET.PERTURB_POSITION_PROB", "0.0"]


def tiny_cfg(*opts):
    return build_config(SHAPES_CONFIG, [*TINY, *opts])


def tiny_model(*opts, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(*opts))


def jiggled(model, seed=1):
    """Move every parameter a little so the zero-initialised box deltas and offsets take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g).to(p))
    return model


def synthetic_batch(num_images: int = 2, seed: int = 0, size=(96, 128)):
    """Random images with 1-3 random boxes each, in Detectron2's mapped-dict format."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(num_images):
        n = int(torch.randint(1, 4, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        wh = 8 + torch.rand(n, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, 8, (n,), generator=g)
        image = (torch.rand(3, h, w, generator=g) * 255).round()
        batch.append({"image": image, "instances": inst, "height": h, "width": w})
    return batch
