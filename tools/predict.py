#!/usr/bin/env python
"""Run a trained detector on your own images or a video and draw its detections.

    .venv/bin/python tools/predict.py --config-file configs/shapes/demo.yaml \\
        --input photos/ "more/*.jpg" one.png --output output/predictions \\
        --opts MODEL.WEIGHTS output/demo/model_final.pth
    .venv/bin/python tools/predict.py --config-file X.yaml --video-input clip.mp4 --output out.mp4 \\
        --opts MODEL.WEIGHTS model.pth

The interface of Detectron2's ``demo/demo.py``. Images are read with Detectron2's ``read_image``
(EXIF orientation, grayscale and RGBA handled) and fed to :class:`deqdet.predictor.Predictor`
(Detectron2's ``DefaultPredictor``, which resizes them as at test time and converts them to
``INPUT.FORMAT``, under ``TEST.AUTOCAST``); detections with a score of at least
``--confidence-threshold`` are drawn with ``Visualizer``, labelled with the class names stored in the
checkpoint (those of the training data; ``DATASETS.TEST`` only for a checkpoint without them).
``--output``: a folder (one PNG per input, named after it) or, for a single input, a file name.
Without ``--output`` the detections are only listed. An input that cannot be read, or a path or
glob that names no file, is reported in one line (``skipped ...``) and skipped, and so are, in one
line per folder, the files of a folder that are not images by their extension; the exit status is
1 when no input could be read. Runs on ``MODEL.DEVICE`` (CUDA when available, else CPU).
"""

from __future__ import annotations

import argparse
import os
import sys

import cv2
import tqdm
import deqdet  # noqa: F401  (first: it imports Detectron2 without the import-time warnings; registers models)
from detectron2.data import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.utils.visualizer import Visualizer

from deqdet.engine import build_config
from deqdet.errors import UserInputError, one_line
from deqdet.inference import find_inputs
from deqdet.predictor import Predictor as DeqdetPredictor
from deqdet.quiet import silence_known_warnings

LISTED = 5  # detections named per image; the others are counted


def count(n: int, noun: str) -> str:
    """``1 detection``, ``2 detections``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument("--input", nargs="+", help="images: files, globs (quoted) or folders")
    parser.add_argument("--video-input", help="a video file")
    parser.add_argument(
        "--output", help="folder for the drawn images (or a file name for one input / the video)"
    )
    parser.add_argument(
        "--confidence-threshold", type=float, default=0.5, help="minimum score of drawn detections"
    )
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides: KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth MODEL.DEVICE cpu",
    )
    return parser


def output_path(output: str, input_path: str, num_inputs: int) -> str:
    """A folder (existing, ending with a separator, or several inputs) gets ``<input name>.png``."""
    if num_inputs > 1 or os.path.isdir(output) or output.endswith(os.sep):
        os.makedirs(output, exist_ok=True)
        return os.path.join(output, os.path.splitext(os.path.basename(input_path))[0] + ".png")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    return output


class Predictor:
    """:class:`deqdet.predictor.Predictor` (``DefaultPredictor`` under ``TEST.AUTOCAST``) + thresholding +
    ``Visualizer`` drawing on RGB images."""

    def __init__(self, cfg, threshold: float):
        self.predictor = DeqdetPredictor(cfg)
        self.classes = self.predictor.classes  # the training data's, from the checkpoint
        self.metadata = self.classes.metadata() if self.classes else Metadata()
        self.threshold = threshold

    def __call__(self, image_bgr):
        """uint8 H x W x 3 BGR -> (the kept ``Instances`` on CPU, the drawn RGB image)."""
        instances = self.predictor(image_bgr)["instances"].to("cpu")
        instances = instances[instances.scores >= self.threshold]
        drawn = Visualizer(image_bgr[:, :, ::-1], self.metadata).draw_instance_predictions(instances)
        return instances, drawn.get_image()

    def describe(self, instances) -> str:
        """``N detections: <class> <score>, ...``, highest score first; past :data:`LISTED` detections
        ``N detections, the 5 highest: ...``."""
        label = self.classes.label if self.classes else str
        order = instances.scores.argsort(descending=True)[:LISTED].tolist()
        parts = [f"{label(instances.pred_classes[i].item())} {instances.scores[i].item():.2f}" for i in order]
        listed = f", the {len(parts)} highest" if len(parts) < len(instances) else ""
        return count(len(instances), "detection") + (f"{listed}: " + ", ".join(parts) if parts else "")


def predict_images(predictor: Predictor, paths, output) -> int:
    """Returns the number of inputs that could not be read."""
    failures = 0
    # on stderr and only on a terminal (disable=None), so that it never mixes into the listing
    for path in tqdm.tqdm(paths, desc="images", unit="img", disable=None if len(paths) > 1 else True):
        try:
            image = read_image(path, format="BGR")
        except Exception as e:  # PIL / OS errors: any reason the file is not a readable image
            tqdm.tqdm.write(
                f"skipped {path}: cannot read image: {' '.join(str(e).split())}", file=sys.stderr
            )
            failures += 1
            continue
        instances, drawn = predictor(image)
        message = f"{path}: {predictor.describe(instances)}"
        if output:
            target = output_path(output, path, len(paths))
            cv2.imwrite(target, drawn[:, :, ::-1])
            message += f" -> {target}"
        tqdm.tqdm.write(message)
    return failures


def predict_video(predictor: Predictor, path: str, output) -> None:
    video = cv2.VideoCapture(path)
    if not video.isOpened() or int(video.get(cv2.CAP_PROP_FRAME_COUNT)) <= 0:
        raise UserInputError(f"--video-input {path}: cannot read video")
    fps = video.get(cv2.CAP_PROP_FPS) or 25.0
    count = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = None
    if output:
        target = (
            output
            if os.path.splitext(output)[1]
            else os.path.join(output, os.path.splitext(os.path.basename(path))[0] + ".mp4")
        )
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    for _ in tqdm.trange(count, desc="frames", unit="frame", disable=None):
        ok, frame = video.read()
        if not ok:
            break
        _, drawn = predictor(frame)
        if output:
            if writer is None:
                writer = cv2.VideoWriter(
                    target, cv2.VideoWriter_fourcc(*"mp4v"), fps, (drawn.shape[1], drawn.shape[0])
                )
            writer.write(drawn[:, :, ::-1])
    video.release()
    if writer is not None:
        writer.release()
        print(f"wrote {target}")


def main(argv=None) -> int:
    silence_known_warnings()
    args = get_parser().parse_args(argv)
    if bool(args.input) == bool(args.video_input):
        print("error: give either --input or --video-input", file=sys.stderr)
        return 2
    paths, missing = find_inputs(args.input) if args.input else (None, [])
    for pattern in missing:
        print(f"skipped {pattern}: no such file, folder with images, or matching glob", file=sys.stderr)
    failures = len(missing)
    try:
        cfg = build_config(args.config_file, args.opts)
        if paths is None:
            predict_video(Predictor(cfg, args.confidence_threshold), args.video_input, args.output)
            return 0
        if paths:
            failures += predict_images(Predictor(cfg, args.confidence_threshold), paths, args.output)
    except UserInputError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    total = len(paths) + len(missing)
    if failures:
        print(f"{failures} of {total} inputs could not be read", file=sys.stderr)
    return 1 if failures == total else 0


if __name__ == "__main__":
    sys.exit(main())
