"""DEQDecoder.trace against the inference solver, the refinement pictures (function and CLI), and the
DEQ steps / residual statistics reported by the evaluator."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from deqdet.deq_evaluator import DEQStatisticsEvaluator, deq_statistics, final_residual
from deqdet.visualization import default_steps, render_refinement
from tests.helpers import (
    DENSE_QUERY_CONFIG,
    SHAPES_CONFIG,
    TINY,
    TINY_DENSE_QUERY,
    jiggled,
    synthetic_batch,
    tiny_cfg,
    tiny_model,
)

MAX_ITERS = ["MODEL.DEQDET.MAX_ITERS", "3"]


@pytest.fixture(scope="module")
def model():
    return jiggled(tiny_model(*MAX_ITERS)).eval()


def test_trace_follows_the_inference_iteration(model):
    batch = synthetic_batch(2)
    with torch.no_grad():
        out = model([{"image": x["image"]} for x in batch])
        queries = model.initial_queries(batch)
        content, xyzr, features = queries.content, queries.xyzr, queries.features
        states = model.decoder.trace(content, xyzr, features, 4)
        last = model.decoder.predict(content, xyzr, features)
    assert (
        len(states) == 5
        and states[0]["logits"].shape == (2, 12, 8)
        and states[0]["boxes"].shape == (2, 12, 4)
    )
    assert torch.isnan(states[0]["residual"]).all()
    # steps 1..3 are the solver's 3 iterations (TOL 0), step 4 is the output step of inference
    torch.testing.assert_close(
        torch.stack([s["residual"] for s in states[1:4]], 1),
        torch.stack([o["residuals"] for o in out]),
        rtol=1e-4,
        atol=1e-6,
    )
    torch.testing.assert_close(states[4]["logits"], last["logits"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(states[4]["boxes"], last["boxes"], rtol=1e-4, atol=1e-3)
    assert not torch.allclose(states[1]["boxes"], states[4]["boxes"])  # the boxes do move


def test_default_steps_end_at_the_output_step():
    assert default_steps(20) == [0, 1, 2, 4, 8, 16, 21]
    assert default_steps(3) == [0, 1, 2, 4]
    assert default_steps(0) == [0, 1]


def test_render_refinement_writes_grid_curves_and_gif(model, tmp_path):
    cfg = tiny_cfg(*MAX_ITERS)
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 255, (90, 120, 3), dtype=np.uint8),
        rng.integers(0, 255, (70, 60, 3), dtype=np.uint8),
    ]
    model.train()
    paths = render_refinement(cfg, model, images, str(tmp_path / "sub" / "r"), steps=[0, 1, 3], num_boxes=4)
    assert model.training  # mode restored
    assert set(paths) == {"grid", "curves", "gif"}
    gif = Image.open(paths["gif"])
    assert gif.n_frames == 4  # init stage + every step up to max(steps)
    grid = np.asarray(Image.open(paths["grid"]))
    # 2 rows x 3 columns of tiles drawn with their longer side at 384 px (90x120 -> 288x384, 70x60 ->
    # 384x329), 4 px gaps
    assert grid.shape[:2] == (288 + 4 + 384 + 4, 3 * (384 + 4))
    assert Image.open(paths["curves"]).size[0] > 0


def test_render_refinement_on_the_combined_detector(tmp_path):

    from deqdet.engine import build_config
    from deqdet.inference import build_inference_model

    cfg = build_config(DENSE_QUERY_CONFIG, TINY_DENSE_QUERY)
    torch.manual_seed(0)
    model, _ = build_inference_model(cfg)
    image = np.random.default_rng(2).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    paths = render_refinement(cfg, model, [image], str(tmp_path / "dq"))
    assert Image.open(paths["gif"]).n_frames == 4  # init stage + MAX_ITERS + 1 steps (default_steps(2))


def test_render_refinement_refuses_a_model_without_deq_decoder(tmp_path):
    cfg = tiny_cfg("MODEL.QUERY.DECODER", "AdaMixerDecoder", "MODEL.QUERY.NUM_STAGES", "2")
    adamixer = tiny_model("MODEL.QUERY.DECODER", "AdaMixerDecoder", "MODEL.QUERY.NUM_STAGES", "2")
    with pytest.raises(ValueError, match="DEQDecoder"):
        render_refinement(cfg, adamixer, [np.zeros((64, 64, 3), np.uint8)], str(tmp_path / "r"))


def test_visualize_refinement_cli(tmp_path, capsys):
    from tools.visualize_refinement import main

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 100, 3), dtype=np.uint8)).save(image)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    opts = ["--opts", *TINY, *MAX_ITERS]
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--input",
                str(image),
                str(tmp_path / "broken.png"),
                str(tmp_path / "gone.png"),
                "--output",
                str(tmp_path / "out" / "r"),
                "--steps",
                "0",
                "2",
                *opts,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert (tmp_path / "out" / "r.gif").is_file()
    assert f"skipped {tmp_path / 'broken.png'}: cannot read image" in captured.err
    assert f"skipped {tmp_path / 'gone.png'}: no such file" in captured.err  # named and skipped, not fatal
    assert not any(line.startswith("error:") for line in captured.err.splitlines())
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--input",
                str(tmp_path / "missing.png"),
                "--output",
                str(tmp_path / "r"),
                *opts,
            ]
        )
        == 2
    )
    assert "missing.png" in capsys.readouterr().err


def test_deq_statistics_by_hand():
    stats = deq_statistics([3, 5, 7, 21], [0.1, 0.3, float("nan"), 0.2])
    assert stats["mean_steps"] == 9.0 and stats["min_steps"] == 3.0 and stats["max_steps"] == 21.0
    assert stats["steps_p50"] == 6.0
    assert math.isclose(stats["mean_final_residual"], 0.2) and math.isclose(stats["final_residual_p50"], 0.2)
    assert final_residual(torch.tensor([0.5, 0.25, float("nan")])) == 0.25
    assert math.isnan(final_residual(torch.zeros(0)))


def test_evaluator_reports_deq_outputs_and_ignores_others():
    evaluator = DEQStatisticsEvaluator()
    evaluator.reset()
    evaluator.process(
        [{}, {}],
        [
            {"instances": None, "steps": torch.tensor(4), "residuals": torch.tensor([0.4, 0.2, 0.1])},
            {
                "instances": None,
                "steps": torch.tensor(2),
                "residuals": torch.tensor([0.3, float("nan"), float("nan")]),
            },
        ],
    )
    result = evaluator.evaluate()["deq"]
    assert result["mean_steps"] == 3.0 and math.isclose(result["mean_final_residual"], 0.2, rel_tol=1e-6)
    evaluator.reset()
    evaluator.process([{}], [{"instances": None}])
    assert evaluator.evaluate() == {}
    # MODEL.DEQDET.TEST_OUTPUT init: no step, no residual
    evaluator.reset()
    evaluator.process([{}], [{"instances": None, "steps": torch.tensor(0), "residuals": torch.zeros(0)}])
    result = evaluator.evaluate()["deq"]
    assert result["mean_steps"] == 0.0 and result["max_steps"] == 0.0 and "mean_final_residual" not in result
