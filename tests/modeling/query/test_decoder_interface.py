"""The one interface of the query decoders (``QueryDecoder``: ``losses`` in training, ``predict`` in
inference), the named ``DecoderInputs`` of ``initial_queries`` and the named ``StageOutput``."""

import pytest
import torch

from deqdet.modeling.outputs import DecoderInputs, decoder_outputs, query_targets
from deqdet.modeling.query import (
    QUERY_DECODER_REGISTRY,
    AdaMixerDecoder,
    QueryDecoder,
    StageOutput,
    build_query_decoder,
)
from tests.helpers import NO_RAP, jiggled, synthetic_batch, tiny_cfg, tiny_model

DECODERS = {
    "AdaMixerDecoder": ["MODEL.QUERY.DECODER", "AdaMixerDecoder", "MODEL.QUERY.NUM_STAGES", "2"],
    "DEQDecoder": [*NO_RAP, "MODEL.DEQDET.REFINEMENT_STEPS", "2",
                   "MODEL.DEQDET.SUPERVISION_POSITIONS", "(2,)", "MODEL.DEQDET.MAX_ITERS", "2"],
}


@pytest.fixture(params=sorted(DECODERS))
def model(request):
    return jiggled(tiny_model(*DECODERS[request.param]))


def test_every_registered_decoder_is_a_query_decoder():
    assert {"AdaMixerDecoder", "DEQDecoder"} <= {name for name, _ in QUERY_DECODER_REGISTRY}
    for name, cls in QUERY_DECODER_REGISTRY:
        assert issubclass(cls, QueryDecoder), name


def test_training_is_the_decoders_losses(model):
    """The detector's training output is ``decoder.losses`` over its initial queries with the criterion."""
    batch = synthetic_batch(2)
    model.train()
    losses = model(batch)
    queries = model.initial_queries(batch)
    assert isinstance(queries, DecoderInputs) and queries.prior is None
    targets = [query_targets(x["instances"], size) for x, size in zip(batch, queries.images.image_sizes)]
    direct = model.decoder.losses(queries.content, queries.xyzr, queries.features,
                                  lambda preds: model.criterion(preds, targets))
    assert losses.keys() == direct.keys() and len(losses) > 3
    for name in losses:
        torch.testing.assert_close(losses[name].detach(), direct[name].detach(), msg=name)


def test_adamixer_losses_are_the_criterion_over_every_stage():
    model = jiggled(tiny_model(*DECODERS["AdaMixerDecoder"])).eval()
    with torch.no_grad():
        queries = model.initial_queries(synthetic_batch(2))
        predictions = model.decoder(queries.content, queries.xyzr, queries.features)
        seen = []
        losses = model.decoder.losses(queries.content, queries.xyzr, queries.features,
                                      lambda preds: seen.append(preds) or {"n": torch.tensor(len(preds))})
        predicted = model.decoder.predict(queries.content, queries.xyzr, queries.features)
    assert len(predictions) == 2 and int(losses["n"]) == 2 and len(seen) == 1
    for name in ("logits", "boxes"):
        torch.testing.assert_close(predicted[name], predictions[-1][name])


def test_inference_is_the_decoders_prediction(model):
    batch = synthetic_batch(2)
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
        queries = model.initial_queries(batch)
        prediction = model.decoder.predict(queries.content, queries.xyzr, queries.features)
    assert {"logits", "boxes"} <= prediction.keys()
    expected = decoder_outputs(prediction, batch, queries.images.image_sizes, model.detections_per_image)
    assert len(outputs) == len(expected) == 2
    for out, exp in zip(outputs, expected):
        assert out.keys() == exp.keys()
        torch.testing.assert_close(out["instances"].scores, exp["instances"].scores)
        torch.testing.assert_close(out["instances"].pred_boxes.tensor, exp["instances"].pred_boxes.tensor)
    if isinstance(model.decoder, AdaMixerDecoder):
        assert outputs[0].keys() == {"instances"}
    else:
        assert outputs[0].keys() == {"instances", "residuals", "steps"}


def test_stage_output_names_its_fields():
    model = jiggled(tiny_model(*DECODERS["AdaMixerDecoder"])).eval()
    with torch.no_grad():
        queries = model.initial_queries(synthetic_batch(2))
        out = model.decoder.stages[0](queries.content, queries.xyzr, queries.features)
    assert isinstance(out, StageOutput)
    assert out.content.shape == queries.content.shape and out.xyzr.shape == queries.xyzr.shape
    assert out.logits.shape == (2, 12, 8) and out.boxes.shape == (2, 12, 4)
    assert out.prediction().keys() == {"logits", "boxes"} and out.prediction()["boxes"] is out.boxes


def test_a_decoder_outside_the_interface_is_refused():
    @QUERY_DECODER_REGISTRY.register()
    class NotAQueryDecoder(torch.nn.Module):
        def __init__(self, cfg, strides):
            super().__init__()

    try:
        with pytest.raises(TypeError, match="must build a QueryDecoder"):
            build_query_decoder(tiny_cfg("MODEL.QUERY.DECODER", "NotAQueryDecoder"), (4, 8, 16, 32))
    finally:
        del QUERY_DECODER_REGISTRY._obj_map["NotAQueryDecoder"]
