"""The trainer and config set-up shared by ``train_net.py`` and the tools."""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Protocol, runtime_checkable

import detectron2.engine.defaults
import torch
import yaml
from detectron2.config import CfgNode, get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, HookBase, create_ddp_model, default_setup
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .autocast import autocast_dtype, with_inference_autocast
from .checkpoint.classes import CHECKPOINT_KEY as CLASSES_KEY
from .checkpoint.classes import dataset_classes
from .checkpoint.loading import readable_checkpoint_errors
from .config import add_deqdet_config
from .data.class_count import resolve_class_count
from .data.coco_files import register_coco_files
from .data.loading import checked_dataset_dicts
from .data.mapper import CheckedDatasetMapper, build_train_mapper
from .data.stream import BatchStream, build_stream_loader
from .deq_evaluator import DEQStatisticsEvaluator
from .env import collect_env
from .errors import NonFiniteLossError, UserInputError
from .evaluation import CheckedCOCOEvaluator, OutputKeyEvaluator, install_fast_coco_eval
from .optim import build_optimizer
from .resume import (
    AtomicCheckpointer,
    ReseedAtCheckpoints,
    inexact_resume_reasons,
    loss_normalizers,
    same_graphs_every_call,
)

__all__ = [
    "FiniteLossGuard", "LossScaleObserver", "Trainer", "build_config", "set_float32_matmul_precision",
    "setup",
]

logger = logging.getLogger("deqdet")


def _create_ddp_model(model, **kwargs):
    """Detectron2's ``create_ddp_model``, without ``device_ids`` for a model on the CPU (which
    DistributedDataParallel rejects: Detectron2 passes ``[local rank]`` whatever the device)."""
    if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return create_ddp_model(model, **kwargs)


@contextlib.contextmanager
def _cpu_capable_ddp():
    """``DefaultTrainer.__init__`` wraps the model with the ``create_ddp_model`` of its module,
    looked up when called: use :func:`_create_ddp_model` there meanwhile."""
    original = detectron2.engine.defaults.create_ddp_model
    detectron2.engine.defaults.create_ddp_model = _create_ddp_model
    try:
        yield
    finally:
        detectron2.engine.defaults.create_ddp_model = original


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@runtime_checkable
class LossScaleObserver(Protocol):
    """A module whose forward backpropagates part of its losses itself, at the loss scale it observed in
    the trainer's previous backward (1, or the ``GradScaler``'s scale under AMP), as DEQDecoder's
    gradient stash. The trainer checkpoints that scale and restores it on resumption."""

    def get_loss_scale(self) -> float:
        """The loss scale observed in the last backward (1.0 before the first)."""

    def set_loss_scale(self, scale: float) -> None:
        """Take ``scale`` as the last observed one (resumption)."""


def _loss_scale_observers(model: torch.nn.Module) -> dict[str, LossScaleObserver]:
    """``{module name: module}`` of the model's :class:`LossScaleObserver` modules."""
    return {name: m for name, m in _unwrapped(model).named_modules() if isinstance(m, LossScaleObserver)}


class FiniteLossGuard(HookBase):
    """Stops training at the first non-finite loss term, naming the terms and the iteration
    (:class:`~deqdet.errors.NonFiniteLossError`, raised after the forward, before the backward and
    the optimizer step). One host synchronisation per iteration, as Detectron2's own check."""

    def before_train(self):
        self._handle = _unwrapped(self.trainer.model).register_forward_hook(self._check)

    def after_train(self):
        self._handle.remove()

    def _check(self, module, inputs, losses):
        if not module.training or not isinstance(losses, dict) or not losses:
            return
        values = [v.detach().float().reshape(-1)[0] for v in losses.values()]
        finite = torch.isfinite(torch.stack(values)).tolist()
        if not all(finite):
            bad = ", ".join(f"{name} = {float(v)}" for (name, v), ok in zip(losses.items(), finite) if not ok)
            raise NonFiniteLossError(
                f"loss became non-finite at iteration {self.trainer.iter}: {bad}; training stopped "
                "(lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS or check the data; resume with "
                "--resume from the last checkpoint)"
            )


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` with COCO evaluation (+ DEQ refinement statistics, under ``TEST.AUTOCAST``),
    the project's optimizers,
    ``MODEL.CHANNELS_LAST``, ``MODEL.FLOAT32_MATMUL_PRECISION``, datasets loaded once and checked up
    front (:mod:`deqdet.data.loading`), readable data and checkpoint errors, multi-process training
    on CPUs (gloo) as on GPUs, a stop naming the loss term at a non-finite loss, and exact
    resumption (:mod:`deqdet.resume`: atomic checkpoints; the data stream, the random draws and
    the loss normalisers continue where the checkpoint left them)."""

    def __init__(self, cfg):
        with _cpu_capable_ddp():
            super().__init__(cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ made its checkpointer just before calling this; the periodic
        # checkpointer hook takes it from here, so it becomes the atomic one first.
        self.checkpointer = AtomicCheckpointer(self.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        classes = dataset_classes(self.cfg.DATASETS.TRAIN[0]) if self.cfg.DATASETS.TRAIN else None
        if classes is not None:  # the class names travel with the model
            self.checkpointer.extra_state[CLASSES_KEY] = classes.to_checkpoint()
        hooks = super().build_hooks()
        hooks.insert(0, FiniteLossGuard())
        stream = self._batch_stream
        if stream is not None:
            hooks.insert(0, ReseedAtCheckpoints(self.cfg.SOLVER.CHECKPOINT_PERIOD, lambda: stream.seed))
        return hooks

    @property
    def _batch_stream(self) -> BatchStream | None:
        stream = getattr(self.data_loader, "dataset", None)
        return stream if isinstance(stream, BatchStream) else None

    def state_dict(self):
        state = super().state_dict()
        observers = _loss_scale_observers(self.model)
        state["loss_scales"] = {name: m.get_loss_scale() for name, m in observers.items()}
        state["loss_normalizers"] = loss_normalizers(_unwrapped(self.model))
        if self._batch_stream is not None:
            state["data_seed"] = self._batch_stream.seed
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict.get("loss_scales", {})
        for name, module in _loss_scale_observers(self.model).items():
            if name in saved:
                module.set_loss_scale(saved[name])
        modules = dict(_unwrapped(self.model).named_modules())
        for name, value in state_dict.get("loss_normalizers", {}).items():
            modules[name].loss_normalizer = value
        stream = self._batch_stream
        resumed = stream is not None and "data_seed" in state_dict
        if resumed:
            stream.resume(state_dict["data_seed"], self.iter + 1)
        if comm.is_main_process():
            reasons = inexact_resume_reasons(self.cfg, self.iter + 1, resumed)
            if reasons:
                logger.warning(f"resuming at iteration {self.iter + 1}, not exactly as an uninterrupted run: "
                               + "; ".join(reasons))
            else:
                logger.info(f"resuming at iteration {self.iter + 1}: data stream, random draws and optimizer "
                            "state continue exactly as in an uninterrupted run")

    def train(self):
        with same_graphs_every_call():
            return super().train()

    @classmethod
    def build_model(cls, cfg):
        set_float32_matmul_precision(cfg)
        model = super().build_model(cfg)
        if cfg.MODEL.CHANNELS_LAST:
            model.to(memory_format=torch.channels_last)
        return model

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Detectron2's evaluation, under ``TEST.AUTOCAST``."""
        return super().test(cfg, with_inference_autocast(model, cfg), evaluators)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO AP and DEQ steps (nothing for models without a DEQ decoder); with
        ``MODEL.DENSE_QUERY.INFERENCE_SOURCE both`` also the COCO AP (task ``dense_bbox``) of the combined
        detector's dense head, whose detections its outputs carry as ``dense_instances``, from the same
        pass."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)

        def coco(folder):
            return CheckedCOCOEvaluator(dataset_name, output_dir=folder,
                                        max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

        evaluators = [coco(output_folder), DEQStatisticsEvaluator()]
        if cfg.MODEL.DENSE_QUERY.INFERENCE_SOURCE == "both":
            dense = coco(os.path.join(output_folder, "dense_head"))
            evaluators.append(OutputKeyEvaluator(dense, key="dense_instances", prefix="dense_"))
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """With ``DATALOADER.SAMPLER_TRAIN`` "TrainingSampler" (the default) a DataLoader over a
        :class:`~deqdet.data.stream.BatchStream` seeded by ``SEED`` (a shared random seed when
        negative, kept in the checkpoints): Detectron2's data order, grouping and augmentation,
        resumable exactly; with another sampler, Detectron2's train loader."""
        dataset = checked_dataset_dicts(cfg, cfg.DATASETS.TRAIN, is_train=True)
        mapper = build_train_mapper(cfg)
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset)
        world_size = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world_size:
            raise UserInputError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                                 f"{world_size} processes")
        stream = BatchStream(
            dataset, mapper, batch_size=cfg.SOLVER.IMS_PER_BATCH // world_size,
            seed=cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed(),
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        )
        return build_stream_loader(stream, cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            dataset=checked_dataset_dicts(cfg, [dataset_name], is_train=False),
            mapper=CheckedDatasetMapper(cfg, is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )

    def resume_or_load(self, resume=True):
        with readable_checkpoint_errors(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume=resume):
            super().resume_or_load(resume=resume)


def set_float32_matmul_precision(cfg: CfgNode) -> None:
    """``torch.set_float32_matmul_precision(MODEL.FLOAT32_MATMUL_PRECISION)`` (process-wide; "high" lets
    float32 matmuls use TF32 on GPUs that have it, as the official DEQDet does)."""
    precision = cfg.MODEL.FLOAT32_MATMUL_PRECISION
    if precision not in ("highest", "high", "medium"):
        raise UserInputError(
            f"MODEL.FLOAT32_MATMUL_PRECISION must be 'highest', 'high' or 'medium', got {precision!r}")
    torch.set_float32_matmul_precision(precision)


def build_config(config_file: str, opts: list[str] | None = None) -> CfgNode:
    """Defaults + the project's keys + ``config_file`` + ``opts``, frozen; the datasets of
    ``DATASETS.COCO_FILES`` registered; one class count for every head (from the data unless set,
    :mod:`deqdet.data.class_count`).

    Raises:
        UserInputError: the config file is missing or unreadable, a key is unknown, the class counts
            set disagree, or ``TEST.AUTOCAST`` names no dtype.
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
    register_coco_files(cfg)
    resolve_class_count(cfg, _keys_set(config_file, opts or []))
    cfg.freeze()
    autocast_dtype(cfg)  # an unknown TEST.AUTOCAST fails here, not after training
    return cfg


def _keys_set(config_file: str, opts: list[str]) -> set[str]:
    """The dotted keys ``config_file`` (with its ``_BASE_`` files) and the ``opts`` pairs set."""

    def flat(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for name, value in node.items():
            keys |= flat(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
        return keys

    keys = flat(CfgNode.load_yaml_with_base(config_file)) if config_file else set()
    return keys | set(opts[0::2])


@contextlib.contextmanager
def _quiet_cpp_extension_import():
    """Detectron2's environment report (``default_setup``) imports ``torch.utils.cpp_extension``,
    which on a machine with a CUDA toolkit folder but no GPU warns "No CUDA runtime is found" when
    imported; the report states the CUDA status anyway, so that one warning is silenced."""
    cpp_logger = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_logger.level
    cpp_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        cpp_logger.setLevel(level)


def setup(args) -> CfgNode:
    """``build_config`` from command-line ``args``, then Detectron2's ``default_setup``; the
    ``deqdet`` logger writes to the console and ``OUTPUT_DIR/log.txt`` like Detectron2's, and
    ``COCOEvaluator`` uses the fast COCOeval (:func:`~deqdet.evaluation.install_fast_coco_eval`, before
    the environment report names it)."""
    install_fast_coco_eval()
    cfg = build_config(args.config_file, args.opts)
    with _quiet_cpp_extension_import():
        default_setup(cfg, args)
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="deqdet")  # data checks, skips
    if comm.is_main_process():
        logging.getLogger("detectron2").info("deqdet environment:\n" + collect_env())
    return cfg
