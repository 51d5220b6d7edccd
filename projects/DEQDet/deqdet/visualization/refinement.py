"""Watch a DEQ decoder refine: boxes after the init stage and after each refinement step.

:func:`render_refinement` runs a detector whose decoder is a ``DEQDecoder`` (``QueryDetector`` with
``MODEL.QUERY.DECODER: "DEQDecoder"``, or any model with the same ``initial_queries`` method) on a few
images, traces the decoder's states with :meth:`DEQDecoder.trace` and writes

- ``{out_prefix}_grid.png``: rows = images, columns = the init stage and the chosen steps, with the
  top-scoring detections drawn by Detectron2's ``Visualizer``;
- ``{out_prefix}_curves.png``: per image, the relative residual of each step (log scale) and the
  scores of the top detections after each step;
- ``{out_prefix}.gif``: one frame per state (init, step 1, 2, ...), the images side by side.

``tools/visualize_refinement.py`` is its command line; ``make demo`` calls it after training.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Instances
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from ..modeling.dense_query import quality_logits
from ..modeling.outputs import topk_detections

__all__ = ["default_steps", "render_refinement", "trace_refinement"]


def default_steps(max_iters: int) -> List[int]:
    """0 (init stage), then 1, 2, 4, 8, ... below ``max_iters + 1`` and ``max_iters + 1`` itself
    (the output step of inference with ``TOL 0``)."""
    last = max_iters + 1
    steps, s = [0], 1
    while s < last:
        steps.append(s)
        s *= 2
    return steps + [last]


def _decoder(model):
    decoder = getattr(model, "decoder", None)
    if not hasattr(decoder, "trace") or not hasattr(model, "initial_queries"):
        raise ValueError(
            f"{type(model).__name__} has no DEQ decoder to trace: use a config with "
            "MODEL.QUERY.DECODER 'DEQDecoder'"
        )
    return decoder


@torch.no_grad()
def trace_refinement(cfg, model, images: Sequence[np.ndarray], num_steps: int, num_boxes: int = 10):
    """Run ``model`` on ``images`` (uint8 H x W x 3 in ``cfg.INPUT.FORMAT``, resized as
    ``DefaultPredictor`` does) and trace ``num_steps`` refinement steps.

    Returns:
        ``states[i][j]``: the top ``num_boxes`` detections (``Instances``, original-image pixels) of
        image ``j`` after ``i`` steps (0: init stage); ``residuals`` (num_steps + 1, num_images) float
        numpy array, NaN in row 0.
    """
    decoder = _decoder(model)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    inputs = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected uint8 H x W x 3 images, got {image.dtype} {image.shape}")
        resized = resize.get_transform(image).apply_image(image)
        inputs.append({"image": torch.as_tensor(resized.transpose(2, 0, 1).astype("float32"))})
    was_training = model.training
    model.eval()
    try:
        queries = model.initial_queries(inputs)
        trace = decoder.trace(queries.content, queries.xyzr, queries.features, num_steps)
        if queries.prior is not None:  # the detector scores its queries with this prior added (class prior)
            trace = [{**s, "logits": s["logits"] + queries.prior} for s in trace]
    finally:
        model.train(was_training)
    # the detector's own ranking (top-k over (query, class) pairs), back in original-image pixels
    states = [
        [
            detector_postprocess(r, *image.shape[:2]).to("cpu")
            for r, image in zip(
                topk_detections(quality_logits(s), s["boxes"], queries.images.image_sizes, num_boxes), images
            )
        ]
        for s in trace
    ]
    residuals = torch.stack([s["residual"] for s in trace]).float().cpu().numpy()
    return states, residuals


def _draw(image_rgb: np.ndarray, detections: Instances, metadata) -> np.ndarray:
    scale = max(1.0, 384 / max(image_rgb.shape[:2]))  # small images get readable labels
    return Visualizer(image_rgb, metadata, scale=scale).draw_instance_predictions(detections).get_image()


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    tile = tile.copy()
    cv2.putText(tile, text, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(tile, text, (6, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _step_name(step: int) -> str:
    return "init stage" if step == 0 else f"step {step}"


def _hstack(tiles: List[np.ndarray]) -> np.ndarray:
    height = max(t.shape[0] for t in tiles)
    return np.hstack(
        [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0)), constant_values=255) for t in tiles]
    )


def _write_curves(path: str, states, residuals: np.ndarray, names: Sequence[str], num_boxes: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = np.arange(len(states))
    fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    for j, name in enumerate(names):
        line = ax_r.semilogy(steps[1:], residuals[1:, j], marker="o", ms=3, label=name)[0]
        # scores are sorted; boxes left empty after clipping are gone, so a state may hold fewer
        top1 = [float(s[j].scores[0]) if len(s[j]) else np.nan for s in states]
        mean = [float(s[j].scores.mean()) if len(s[j]) else np.nan for s in states]
        ax_s.plot(steps, top1, color=line.get_color(), marker="o", ms=3, label=f"{name}: top-1")
        ax_s.plot(steps, mean, color=line.get_color(), ls="--", label=f"{name}: mean of top-{num_boxes}")
    ax_r.set(
        xlabel="refinement step",
        ylabel=r"relative residual $\|z_i - z_{i-1}\| / \|z_{i-1}\|$",
        title="residual per step",
    )
    ax_s.set(xlabel="refinement step (0 = init stage)", ylabel="score", title="scores of the top detections")
    for ax in (ax_r, ax_s):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_refinement(
    cfg,
    model,
    images: Sequence[np.ndarray],
    out_prefix: str,
    metadata=None,
    steps: Optional[Sequence[int]] = None,
    num_boxes: int = 10,
    names: Optional[Sequence[str]] = None,
) -> Dict[str, str]:
    """Write the refinement grid PNG, the residual / score curves PNG and the GIF (module docstring).

    Args:
        cfg: the model's config (``INPUT.FORMAT``, test resize, ``MODEL.DEQDET.MAX_ITERS``).
        model: the detector, its decoder a ``DEQDecoder``; its train/eval mode is restored after.
        images: uint8 H x W x 3 arrays in ``cfg.INPUT.FORMAT`` (``read_image(path, cfg.INPUT.FORMAT)``).
        out_prefix: path prefix of the outputs (its folder is created).
        metadata: Detectron2 ``Metadata`` for class names (e.g. ``MetadataCatalog.get(name)``).
        steps: the columns of the grid (0 = init stage); default :func:`default_steps` of
            ``MODEL.DEQDET.MAX_ITERS``. The GIF and the curves show every step up to ``max(steps)``.
        num_boxes: detections drawn per image and state (the top ones by score).
        names: legend name per image (default ``image 1``, ...).

    Returns:
        ``{"grid": path, "curves": path, "gif": path}``.
    """
    if not images:
        raise ValueError("no images to render")
    steps = sorted(set(default_steps(cfg.MODEL.DEQDET.MAX_ITERS) if steps is None else steps))
    if steps[0] < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    names = list(names) if names is not None else [f"image {j + 1}" for j in range(len(images))]
    states, residuals = trace_refinement(cfg, model, images, steps[-1], num_boxes)
    rgb = [im[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else im for im in images]
    tiles = [[_draw(rgb[j], state[j], metadata) for j in range(len(images))] for state in states]
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    paths = {
        "grid": f"{out_prefix}_grid.png",
        "curves": f"{out_prefix}_curves.png",
        "gif": f"{out_prefix}.gif",
    }

    rows = [_hstack([_label(tiles[s][j], _step_name(s)) for s in steps]) for j in range(len(images))]
    width = max(r.shape[1] for r in rows)
    grid = np.vstack(
        [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    )
    cv2.imwrite(paths["grid"], grid[:, :, ::-1])

    _write_curves(paths["curves"], states, residuals, names, num_boxes)

    frames = [
        Image.fromarray(_hstack([_label(t, _step_name(i)) for t in tiles[i]])) for i in range(len(states))
    ]
    frames[0].save(
        paths["gif"],
        save_all=True,
        append_images=frames[1:],
        duration=[1200] + [600] * (len(frames) - 1),
        loop=0,
    )
    return paths
