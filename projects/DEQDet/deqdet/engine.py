"""The trainer and config set-up shared by ``train_net.py`` and the tools."""

from __future__ import annotations

import json
import logging
import os

import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.data import build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.utils import comm

from .config import add_deqdet_config
from .data.mapper import CheckedDatasetMapper, build_train_mapper
from .deq_evaluator import DEQStatisticsEvaluator
from .env import collect_env
from .errors import UserInputError
from .solver import build_optimizer

__all__ = ["Trainer", "build_config", "set_float32_matmul_precision", "setup"]

logger = logging.getLogger("deqdet")


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO evaluation, the project's optimizers, readable data errors,
    ``MODEL.CHANNELS_LAST`` and ``MODEL.FLOAT32_MATMUL_PRECISION``."""

    @classmethod
    def build_model(cls, cfg):
        set_float32_matmul_precision(cfg)
        model = super().build_model(cfg)
        if cfg.MODEL.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        coco = COCOEvaluator(
            dataset_name,
            output_dir=output_folder,
            max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        return DatasetEvaluators([coco, DEQStatisticsEvaluator()])  # DEQ steps: nothing for other models

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        _check_datasets(cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        _check_datasets([dataset_name])
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, is_train=False))


def set_float32_matmul_precision(cfg: CfgNode) -> None:
    """``torch.set_float32_matmul_precision(MODEL.FLOAT32_MATMUL_PRECISION)`` (process-wide; "high" lets
    float32 matmuls use TF32 on GPUs that have it, as the official DEQDet does)."""
    precision = cfg.MODEL.FLOAT32_MATMUL_PRECISION
    if precision not in ("highest", "high", "medium"):
        raise UserInputError(
            f"MODEL.FLOAT32_MATMUL_PRECISION must be 'highest', 'high' or 'medium', got {precision!r}")
    torch.set_float32_matmul_precision(precision)


def _check_datasets(names) -> None:
    """Load each dataset once, turning a missing or malformed annotation file into a clear error."""
    for name in names:
        if name not in DatasetCatalog.list():
            raise UserInputError(f"dataset {name!r} is not registered (DATASETS.TRAIN / DATASETS.TEST)")
        json_file = MetadataCatalog.get(name).get("json_file")
        try:
            DatasetCatalog.get(name)
        except json.JSONDecodeError as e:
            raise UserInputError(f"malformed JSON in {json_file or name}: {e}") from e
        except FileNotFoundError as e:
            raise UserInputError(f"annotation file of dataset {name!r} not found: {e.filename or json_file}") from e


def build_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """Defaults + the project's keys + ``config_file`` + ``opts``, frozen.

    Raises:
        UserInputError: the config file is missing or unreadable, or a key is unknown.
    """
    cfg = get_cfg()
    add_deqdet_config(cfg)
    if config_file:
        if not os.path.isfile(config_file):
            raise UserInputError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except KeyError as e:
            raise UserInputError(f"{config_file}: {e.args[0]}") from e
        except OSError as e:  # a _BASE_ file that is missing or unreadable
            raise UserInputError(f"{config_file}: cannot read {e.filename}: {e.strerror}") from e
        except (yaml.YAMLError, AssertionError, ValueError) as e:
            raise UserInputError(f"{config_file}: {e}") from e
    try:
        cfg.merge_from_list(opts or [])
    except (KeyError, AssertionError, ValueError) as e:
        raise UserInputError(f"command-line override: {e.args[0] if e.args else e}") from e
    cfg.freeze()
    return cfg


def setup(args) -> CfgNode:
    """``build_config`` from command-line ``args``, then Detectron2's ``default_setup``."""
    cfg = build_config(args.config_file, args.opts)
    default_setup(cfg, args)
    if comm.is_main_process():
        logging.getLogger("detectron2").info("deqdet environment:\n" + collect_env())
    return cfg
