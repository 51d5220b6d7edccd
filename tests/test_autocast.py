"""TEST.AUTOCAST: inference under torch.autocast through the predictor and the trainer's evaluation,
detections in float32 and close to the float32 model's; a bad value is a one-line error."""

import numpy as np
import pytest
import torch

from deqdet.autocast import AutocastInference, with_inference_autocast
from deqdet.engine import Trainer, build_config
from deqdet.errors import UserInputError
from deqdet.predictor import Predictor
from tests.helpers import TINY, tiny_cfg, tiny_model


def _predict(*opts):
    cfg = tiny_cfg("MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "128", *opts)
    predictor = Predictor(cfg)
    model = predictor.model.model if isinstance(predictor.model, AutocastInference) else predictor.model
    reference = tiny_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the same weights each call, moved enough for distinct boxes inside the image
        for p in reference.parameters():
            p.add_(0.005 * torch.randn(p.shape, generator=g))
    model.load_state_dict(reference.state_dict())
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    return predictor, predictor(image)["instances"]


def test_bfloat16_detections_are_float32_and_close_to_float32():
    plain, expected = _predict()
    wrapped, actual = _predict("TEST.AUTOCAST", "bfloat16")
    assert not isinstance(plain.model, AutocastInference)
    assert isinstance(wrapped.model, AutocastInference) and wrapped.model.dtype == torch.bfloat16
    assert len(actual) == len(expected) > 0
    assert actual.scores.dtype == actual.pred_boxes.tensor.dtype == torch.float32
    # Rounding may reorder near-equal scores: compare boxes as sets, scores as sorted lists.
    nearest = torch.cdist(actual.pred_boxes.tensor, expected.pred_boxes.tensor).min(1).values
    assert nearest.median() < 1.0  # pixels, on a 96 x 128 image
    a, e = actual.scores.sort().values, expected.scores.sort().values
    assert ((a - e).abs() / e).median() < 0.05
    assert not torch.equal(a, e)  # autocast really ran in 16 bits


def test_wrapper_passes_training_losses_through():
    cfg = tiny_cfg("TEST.AUTOCAST", "bfloat16")
    model = with_inference_autocast(torch.nn.Linear(2, 2), cfg)
    assert isinstance(model, AutocastInference)
    assert with_inference_autocast(model.model, tiny_cfg()) is model.model


def test_unknown_dtype_names_the_key():
    with pytest.raises(UserInputError, match="TEST.AUTOCAST must be one of"):
        build_config("", [*TINY, "TEST.AUTOCAST", "half"])


def test_trainer_evaluates_under_autocast(monkeypatch):
    seen = []

    def fake_test(cfg, model, evaluators=None):
        seen.append(model)
        return {}

    monkeypatch.setattr("detectron2.engine.DefaultTrainer.test",
                        classmethod(lambda cls, *a, **k: fake_test(*a, **k)))
    model = torch.nn.Linear(2, 2)
    Trainer.test(tiny_cfg("TEST.AUTOCAST", "float16"), model)
    Trainer.test(tiny_cfg(), model)
    assert isinstance(seen[0], AutocastInference) and seen[0].dtype == torch.float16 and seen[1] is model
