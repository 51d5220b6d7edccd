"""What the tests share: the repository root, option lists that shrink the `shapes` recipes to seconds
on a CPU, small DEQDet models and synthetic batches, the short runs of the crash / resume and
multi-process tests, and reading a run's outputs."""

import json
import os

import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

import train_net
from deqdet.engine import build_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def config_file(*parts: str) -> str:
    """The path of a config file: ``config_file("shapes", "deqdet_r18.yaml")``."""
    return os.path.join(ROOT, "configs", *parts)


SHAPES_CONFIG = config_file("shapes", "deqdet_r18.yaml")
CPU = ["MODEL.DEVICE", "cpu"]

# A DEQDet (and AdaMixer) of a few thousand parameters per stage.
TINY = [
    *CPU, "MODEL.RESNETS.STEM_OUT_CHANNELS", "16", "MODEL.RESNETS.RES2_OUT_CHANNELS", "16",
    "MODEL.QUERY.NUM_QUERIES", "12", "MODEL.QUERY.CONTENT_DIM", "32", "MODEL.QUERY.FFN_DIM", "64",
    "MODEL.QUERY.FEAT_CHANNELS", "16", "MODEL.QUERY.NECK_NORM_GROUPS", "4", "MODEL.QUERY.NUM_HEADS", "2",
    "MODEL.QUERY.IN_POINTS", "4", "MODEL.QUERY.OUT_POINTS", "8",
]
NO_RAP = ["MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0", "MODEL.DEQDET.PERTURB_POSITION_PROB", "0.0"]

# Query decoder widths with which the short trainings below learn.
TRAINABLE_QUERIES = [
    "MODEL.QUERY.NUM_QUERIES", "20", "MODEL.QUERY.CONTENT_DIM", "64", "MODEL.QUERY.FFN_DIM", "128",
    "MODEL.QUERY.FEAT_CHANNELS", "32", "MODEL.QUERY.NECK_NORM_GROUPS", "8", "MODEL.QUERY.IN_POINTS", "8",
    "MODEL.QUERY.OUT_POINTS", "16",
]
# Short trainings that learn: the `shapes` mini split at 160 px, batch 4, trained and evaluated on itself.
MINI_TRAINING = [
    *CPU, "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "('shapes_mini_train',)",
    "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(160,)", "INPUT.MIN_SIZE_TEST", "160",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.BASE_LR", "0.001", "SOLVER.WARMUP_ITERS", "5", "SOLVER.STEPS", "()",
]

# A few iterations of batch 2 at about 96 px, a checkpoint every 2 iterations, fixed seed, no
# evaluation. One data worker and no aspect-ratio grouping: the conditions of an exact resume.
COMMON = [
    "DATASETS.TRAIN", "('shapes_mini_train',)", "DATASETS.TEST", "()", "SEED", "7", "TEST.EVAL_PERIOD", "0",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "2", "SOLVER.MAX_ITER", "6",
    "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.MAX_SIZE_TRAIN", "128",
    "DATALOADER.ASPECT_RATIO_GROUPING", "False", "INPUT.MIN_SIZE_TRAIN", "(96, 112)", *CPU,
]
SMALL_QUERIES = [
    "MODEL.QUERY.NUM_QUERIES", "8", "MODEL.QUERY.CONTENT_DIM", "32", "MODEL.QUERY.NUM_HEADS", "2",
    "MODEL.QUERY.FEAT_CHANNELS", "32", "MODEL.QUERY.NECK_NORM_GROUPS", "8", "MODEL.QUERY.FFN_DIM", "64",
    "MODEL.QUERY.IN_POINTS", "4", "MODEL.QUERY.OUT_POINTS", "8",
]
# train_net.py arguments. The DEQ decoder with its RAP noise (official probabilities), RAG and the
# gradient stash.
DEQ = ["--config-file", SHAPES_CONFIG, *COMMON, *SMALL_QUERIES,
       "MODEL.DEQDET.REFINEMENT_STEPS", "3", "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 3)",
       "MODEL.DEQDET.RAG", "1", "MODEL.DEQDET.EXTRA_INIT_SUPERVISIONS", "1", "MODEL.DEQDET.MAX_ITERS", "3"]
# The combined detector: ATSS + DyHead dense head whose top boxes initialise the DEQ decoder.
DENSE_QUERY_CONFIG = config_file("shapes", "dyhead_deqdet_r18.yaml")
DENSE_QUERY = ["--config-file", DENSE_QUERY_CONFIG, *COMMON,
               "MODEL.QUERY.NUM_QUERIES", "8", "MODEL.QUERY.FFN_DIM", "64", "MODEL.QUERY.IN_POINTS", "4",
               "MODEL.QUERY.OUT_POINTS", "8", "MODEL.DEQDET.MAX_ITERS", "3"]
# The combined detector at a fraction of its width, for inference.
TINY_DENSE_QUERY = (
    "MODEL.DEVICE cpu MODEL.RESNETS.STEM_OUT_CHANNELS 16 MODEL.RESNETS.RES2_OUT_CHANNELS 16 "
    "MODEL.FPN.OUT_CHANNELS 32 MODEL.QUERY.FEAT_CHANNELS 32 "
    "MODEL.QUERY.CONTENT_DIM 32 MODEL.QUERY.FFN_DIM 64 MODEL.QUERY.NUM_QUERIES 10 MODEL.QUERY.IN_POINTS 4 "
    "MODEL.QUERY.OUT_POINTS 8 MODEL.QUERY.NUM_HEADS 2 MODEL.DEQDET.MAX_ITERS 2"
).split()
ATSS_DYHEAD = ["--config-file", config_file("shapes", "atss_dyhead_r18.yaml"), *COMMON,
               "MODEL.DYHEAD.NUM_CONVS", "1"]
FIXED_SIZE_DATASET = "shapes_fixed_size"


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


def train_main(argv: list):
    """``train_net.py``'s main() in this process (``launch`` runs it directly for one process): what
    it returns (the evaluation results)."""
    return train_net.main(train_net.default_argument_parser().parse_args(argv))


def official_keys(source: str) -> dict:
    """{key: shape} of the official ``source`` checkpoint (``tests/fixtures/<source>_official_keys.json``,
    written from the official code)."""
    with open(os.path.join(FIXTURES, f"{source}_official_keys.json")) as f:
        return json.load(f)["keys"]


def official_state_dict(source: str) -> dict:
    """The official checkpoint's keys with shape-true tensors: each one distinct value broadcast (no
    memory)."""
    shapes = sorted(official_keys(source).items())
    return {key: torch.tensor(float(i)).expand(shape) for i, (key, shape) in enumerate(shapes)}


def run_metrics(output_dir: str) -> list:
    """The records of a run's ``metrics.json``, in order."""
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def final_weights(output_dir: str) -> dict:
    path = os.path.join(output_dir, "model_final.pth")
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def subprocess_env(**extra: str) -> dict:
    """The environment of a child Python that imports this checkout's ``train_net``, ``tests`` and
    ``deqdet`` (ahead of any installed copy), on one thread."""
    paths = [ROOT, os.path.join(ROOT, "projects", "DEQDet"), os.environ.get("PYTHONPATH", "")]
    python_path = os.pathsep.join(p for p in paths if p)
    return {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1", **extra}


def register_fixed_size_dataset(folder: str) -> None:
    """``shapes_mini_train`` with every image cut to 128 x 128 px (boxes clipped, emptied ones
    dropped) as ``FIXED_SIZE_DATASET``: batches of any split pad to the same size."""
    from PIL import Image

    json_path = os.path.join(folder, "fixed.json")
    if os.path.isfile(json_path):
        return _register(FIXED_SIZE_DATASET, json_path)
    src, coco = _mini_train()
    for image in coco["images"]:
        name = os.path.join(folder, os.path.basename(image["file_name"]))
        Image.open(src.parent / image["file_name"]).convert("RGB").crop((0, 0, 128, 128)).save(name)
        image.update(file_name=name, width=128, height=128)
    kept = []
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        w, h = min(x + w, 128) - x, min(y + h, 128) - y
        if w > 4 and h > 4:
            kept.append({**ann, "bbox": [x, y, w, h], "area": w * h})
    coco["annotations"] = kept
    _register(FIXED_SIZE_DATASET, _write(coco, json_path))


def register_first_images(name: str, count: int, folder: str) -> None:
    """The first ``count`` images of ``shapes_mini_train`` with their boxes as data set ``name``: few
    enough for a small detector to learn them by heart in a hundred iterations."""
    src, coco = _mini_train()
    first = coco["images"][:count]
    images = [{**image, "file_name": str(src.parent / image["file_name"])} for image in first]
    ids = {image["id"] for image in images}
    coco.update(images=images, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
    _register(name, _write(coco, os.path.join(folder, f"{name}.json")))


def _mini_train():
    """(path of ``shapes_mini_train``'s COCO JSON, its content)."""
    from deqdet.data import ensure_shapes

    src = ensure_shapes("shapes_mini_train")
    return src, json.loads(src.read_text())


def _write(coco: dict, json_path: str) -> str:
    with open(json_path, "w") as f:
        json.dump(coco, f)
    return json_path


def _register(name: str, json_path: str) -> None:
    """Register (again) the COCO JSON file ``json_path`` (absolute image paths) as data set ``name``."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, json_path, "")
