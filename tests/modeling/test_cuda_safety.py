"""Every tensor a module creates follows its inputs' device and dtype, proven without a GPU: each
detector runs inference and a training step in float64 (a tensor created in float32 somewhere
fails on a dtype mismatch or shows in the losses', gradients' or scores' dtype) and inference under
bfloat16 autocast;
the stages, the sampling and the DEQ refinement loop (TOL 0) run on PyTorch's ``meta`` device, which
has no data: any host read of a tensor value (a host-device synchronisation on CUDA) fails there.
Not on ``meta``: Hungarian matching (SciPy on the host), NMS and the per-image early stop (TOL > 0),
which need host values by design."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from deqdet.engine import build_config
from deqdet.modeling.deq import solver
from tests.helpers import TINY, config_file, synthetic_batch

SHAPES = config_file("shapes")
DETECTORS = {
    "deqdet": ("deqdet_r18.yaml", [*TINY, "MODEL.DEQDET.REFINEMENT_STEPS", "2",
                                   "MODEL.DEQDET.SUPERVISION_POSITIONS", "(2,)",
                                   "MODEL.DEQDET.MAX_ITERS", "2", "MODEL.DEQDET.RAG", "1"]),
    "adamixer": ("adamixer_r18.yaml", [*TINY, "MODEL.QUERY.NUM_STAGES", "2"]),
    "dense_query": ("dyhead_deqdet_r18.yaml", ["MODEL.DEVICE", "cpu", "MODEL.QUERY.NUM_QUERIES", "8",
                                                "MODEL.DEQDET.MAX_ITERS", "2",
                                                "MODEL.ATSS.INFERENCE_TH", "0.0"]),
    "atss_dyhead": ("atss_dyhead_r18.yaml", ["MODEL.DEVICE", "cpu", "MODEL.DYHEAD.NUM_CONVS", "1",
                                             "MODEL.ATSS.INFERENCE_TH", "0.0"]),
}


def _model(name, *opts):
    config, base = DETECTORS[name]
    torch.manual_seed(0)
    return build_model(build_config(os.path.join(SHAPES, config), [*base, *opts]))


def _instances(results):
    return [r["instances"] for r in results]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_float64_inference_and_training(name):
    model = _model(name).double()
    batch = synthetic_batch(2)
    model.train()
    with EventStorage():
        losses = model(batch)
    for key, value in losses.items():
        # Exceptions computed in float32 by the libraries on purpose: the focal terms (fvcore's
        # sigmoid_focal_loss casts its inputs) and ATSS's targets (Detectron2 keeps anchors and
        # ground-truth Boxes in float32). The set criterion's box terms stay in float64.
        if name in ("adamixer", "deqdet"):
            assert value.dtype == (torch.float32 if key.endswith("loss_cls") else torch.float64), key
    sum(losses.values()).backward()
    for n, p in model.named_parameters():
        assert p.grad is None or p.grad.dtype == torch.float64, n
    model.eval()
    with torch.no_grad():
        for inst in _instances(model(batch)):  # Detectron2's Boxes hold float32 whatever the input
            assert len(inst) > 0 and inst.scores.dtype == torch.float64
            assert torch.isfinite(inst.pred_boxes.tensor).all()


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_bfloat16_autocast_inference(name):
    model = _model(name).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for inst in _instances(model(synthetic_batch(2))):
            assert len(inst) > 0
            assert torch.isfinite(inst.pred_boxes.tensor.float()).all()
            assert torch.isfinite(inst.scores.float()).all()


def test_backbone_neck_and_decoder_stages_on_meta():
    model = _model("deqdet").to("meta")
    images = torch.empty(2, 3, 96, 128, device="meta")
    features = model.neck(model.backbone(images))
    content, xyzr = model.queries([(96, 128), (96, 112)])
    assert content.device.type == xyzr.device.type == "meta"
    for stage in (model.decoder.init_stage, model.decoder.refine_stage):
        outputs = stage(content, xyzr, features)
        assert outputs.quality is None  # the papers' stage has no quality branch
        assert all(t.device.type == "meta" for t in outputs[:4])
    adamixer = _model("adamixer").to("meta")
    for prediction in adamixer.decoder(content, xyzr, adamixer.neck(adamixer.backbone(images))):
        assert prediction["boxes"].device.type == "meta" and prediction["boxes"].shape == xyzr.shape


def test_deq_refinement_loop_has_no_host_synchronisation_at_tol_0():
    """The loop of :func:`solve` at TOL 0 with the refinement stage, on ``meta``."""
    model = _model("deqdet").to("meta")
    features = model.neck(model.backbone(torch.empty(2, 3, 96, 128, device="meta")))
    content, xyzr = model.queries([(96, 128), (96, 128)])
    dim = content.shape[-1]
    calls = []

    def step(z, index):
        calls.append(1)
        out = model.decoder.refine_stage(*z.view(2, -1, dim + 4).split([dim, 4], dim=-1), features)
        return torch.cat([out.content, out.xyzr], dim=-1).flatten(1)

    z0 = torch.cat([content, xyzr], dim=-1).flatten(1)
    result = solver.fixed_steps(step, z0, max_iters=3)
    assert len(calls) == 3 and result.state.device.type == "meta" and result.state.shape == z0.shape
    with pytest.raises(RuntimeError, match="meta"):  # a host read fails on meta: the test can fail
        solver.solve(step, z0, tol=0.1, max_iters=3)
