#!/usr/bin/env python
"""Train and evaluate detectors of this project the Detectron2 way.

    python train_net.py --config-file configs/shapes/demo.yaml
    python train_net.py --config-file X.yaml --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --config-file X.yaml --num-gpus 8      # PyTorch DDP, as in Detectron2
    python train_net.py --config-file X.yaml DATASETS.COCO_FILES "('mine=ann.json:images',)" \
        DATASETS.TRAIN "('mine',)"                             # your COCO-format data: docs/own_data.md
"""

import sys

import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm

from deqdet.checkpoint.loading import readable_checkpoint_errors
from deqdet.engine import Trainer, setup
from deqdet.errors import NonFiniteLossError, UserInputError, one_line
from deqdet.quiet import silence_known_warnings


def main(args):
    silence_known_warnings()
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        # weights of other shapes (another class count) are refused rather than evaluated untrained
        weights = cfg.MODEL.WEIGHTS
        with readable_checkpoint_errors(checkpointer, weights, resume=args.resume, inference_cfg=cfg):
            checkpointer.resume_or_load(weights, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results

            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    """Entry point: parse ``argv`` and launch (one process per GPU when ``--num-gpus`` > 1)."""
    args = default_argument_parser().parse_args(argv)
    try:
        return launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (UserInputError, NonFiniteLossError) as e:
        sys.exit(f"error: {one_line(e)}")


if __name__ == "__main__":
    cli()
