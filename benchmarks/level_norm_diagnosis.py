#!/usr/bin/env python
"""Is a shared-BatchNorm ATSS head's AP lost at test time? Re-estimate its tower statistics per level.

    python benchmarks/level_norm_diagnosis.py --config-file configs/shapes/demo.yaml \
        --weights output/protocol/atss_shared_bn@1000/s1/model_final.pth MODEL.META_ARCHITECTURE ATSS \
        MODEL.DYHEAD.NUM_CONVS 0

The checkpoint (trained with ``MODEL.ATSS.NORM BN``, ``NORM_PER_LEVEL False``: one BatchNorm per tower
layer shared by all pyramid levels) is evaluated on ``DATASETS.TEST`` twice: as trained, and after
copying each shared BatchNorm into one BatchNorm per level (``NORM_PER_LEVEL True``) whose running
statistics are re-estimated, with every other weight frozen, as the cumulative mean over ``--batches``
training batches. During training each level is normalised with its own batch statistics either way;
only the running statistics used at test time differ. Writes ``level_norm_diagnosis.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "DEQDet"))

from deqdet.engine import Trainer, setup  # noqa: E402

# Index of the norm slot of tower layer j in ``ATSSHead._tower`` (conv, norm, ReLU per layer).
_NORM_SLOT = 1


def per_level_state_dict(state: dict, num_levels: int, num_convs: int) -> dict:
    """A shared-norm ATSS state dict -> the per-level one: ``head.cls_tower.{3j+1}.*`` copied to
    ``head.cls_norms.{l}.{j}.*`` for every level l (same for ``bbox``)."""
    out = {}
    for key, value in state.items():
        for tower, norms in (("cls_tower", "cls_norms"), ("bbox_tower", "bbox_norms")):
            slots = {f"head.{tower}.{3 * j + _NORM_SLOT}.": j for j in range(num_convs)}
            prefix = next((p for p in slots if key.startswith(p)), None)
            if prefix is not None:
                for level in range(num_levels):
                    out[f"head.{norms}.{level}.{slots[prefix]}.{key[len(prefix):]}"] = value
                break
        else:
            out[key] = value
    return out


@torch.no_grad()
def reestimate(model, cfg, batches: int) -> None:
    """Cumulative running statistics of the per-level tower norms over ``batches`` training batches."""
    norms = [
        m for n, m in model.head.named_modules() if "norms." in n and isinstance(m, torch.nn.BatchNorm2d)
    ]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in norms:
        m.train()
    data = iter(Trainer.build_train_loader(cfg))
    for _ in range(batches):
        images = model.preprocess_image(next(data))
        features = model.backbone(images.tensor)
        model.head([features[f] for f in model.head_in_features])
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    base = ["MODEL.DEVICE", "cpu", "MODEL.ATSS.NORM", "BN", "SEED", "1",
            "OUTPUT_DIR", "output/level_norm_diagnosis"]
    state = torch.load(args.weights, map_location="cpu", weights_only=False)["model"]
    results = {}
    for per_level in (False, True):
        opts = [*args.opts, *base, "MODEL.ATSS.NORM_PER_LEVEL", str(per_level)]
        cfg = setup(argparse.Namespace(config_file=args.config_file, opts=opts, eval_only=True))
        model = Trainer.build_model(cfg)
        if per_level:
            model.load_state_dict(
                per_level_state_dict(state, len(cfg.MODEL.ATSS.IN_FEATURES), cfg.MODEL.ATSS.NUM_CONVS)
            )
            reestimate(model, cfg, args.batches)
        else:
            model.load_state_dict(state)
        results["per_level_reestimated" if per_level else "as_trained"] = Trainer.test(cfg, model)["bbox"]
    results["command"] = "python benchmarks/level_norm_diagnosis.py " + " ".join(sys.argv[1:])
    path = os.path.join(ROOT, "benchmarks", "results", "level_norm_diagnosis.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print({k: round(v["AP"], 2) for k, v in results.items() if k != "command"})


if __name__ == "__main__":
    main()
