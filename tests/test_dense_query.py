"""DenseQueryDetector: the ATSS dense head and the query decoder on one pyramid."""

import os

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, pairwise_iou
from detectron2.utils.events import EventStorage

from deqdet.engine import build_config
from deqdet.errors import UserInputError
from deqdet.modeling.dense_query import DenseQueryDetector
from deqdet.modeling.query.boxes import xyzr_to_xyxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes", "dyhead_deqdet_r18.yaml")
SMALL = ["MODEL.DEVICE", "cpu", "MODEL.DEQDET.MAX_ITERS", "3", "MODEL.QUERY.NUM_QUERIES", "8"]


def _model(*opts, seed=0):
    torch.manual_seed(seed)
    return build_model(build_config(CONFIG, SMALL + list(opts)))


def _inputs(with_objects=True, sizes=((96, 128), (80, 112))):
    g = torch.Generator().manual_seed(1)
    batch = []
    for h, w in sizes:
        inst = Instances((h, w))
        boxes = [[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 100.0, 70.0]] if with_objects else []
        inst.gt_boxes = Boxes(torch.tensor(boxes).reshape(-1, 4))
        inst.gt_classes = torch.tensor([1, 4][: len(boxes)], dtype=torch.long)
        batch.append({"image": torch.randint(0, 255, (3, h, w), generator=g).float(), "instances": inst,
                      "height": h, "width": w})
    return batch


def test_builds_from_config_with_shared_pyramid():
    model = _model()
    assert isinstance(model, DenseQueryDetector)
    strides = {s.stride for name, s in model.backbone.output_shape().items() if name in ("p3", "p4", "p5")}
    assert tuple(model.decoder.refine_stage.strides) == tuple(sorted(strides)) == (8, 16, 32)
    names = {n.split(".")[0] for n, _ in model.named_parameters()}
    assert names == {"dense", "queries", "decoder", "content_proj"}
    assert len(model.backbone.dyhead_tower) == 1


@pytest.mark.parametrize("bad, message", [
    (["MODEL.QUERY.FEAT_CHANNELS", "32"], "MODEL.QUERY.FEAT_CHANNELS"),
    (["MODEL.QUERY.IN_FEATURES", "['p9']"], "MODEL.QUERY.IN_FEATURES"),
    (["MODEL.DENSE_QUERY.INFERENCE_SOURCE", "all"], "MODEL.DENSE_QUERY.INFERENCE_SOURCE"),
    (["MODEL.DENSE_QUERY.DECODER_NMS_THRESH", "0.0"], "MODEL.DENSE_QUERY.DECODER_NMS_THRESH"),
])
def test_bad_config_names_the_key(bad, message):
    with pytest.raises(ValueError, match=message):
        _model(*bad)


def test_training_losses_have_both_heads_and_fall():
    model = _model()
    model.train()
    batch = _inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    totals = []
    with EventStorage(0):
        for _ in range(8):
            losses = model(batch)
            assert all(torch.isfinite(v) for v in losses.values())
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals.append(total.item())
    expected = {"dense_loss_cls", "dense_loss_box_reg", "dense_loss_ctr", "init_loss_cls", "iter2_loss_giou"}
    assert expected <= set(losses)
    assert totals[-1] < 0.8 * totals[0], totals
    # every part of the model got a gradient: the decoder's losses reach the shared pyramid too
    for part in (model.backbone, model.dense.head, model.content_proj, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_image_without_objects_trains():
    model = _model()
    model.train()
    with EventStorage(0):
        losses = model(_inputs(with_objects=False))
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.dense.head.cls_logits.weight.grad.abs().sum() > 0


def test_dense_topk_queries_start_at_distinct_dense_boxes():
    model = _model().eval()
    batch = _inputs(with_objects=False)
    with torch.no_grad():
        inputs, dense_features, _, outputs = model._forward_parts(batch)
        images = inputs.images
        proposals = model.dense_proposals(images, dense_features, outputs)
        xyzr = model.initial_queries(batch).xyzr
    for i, (p, (h, w)) in enumerate(zip(proposals, images.image_sizes)):
        n = len(p)
        assert 0 < n <= 8
        assert (p.scores[:-1] >= p.scores[1:]).all()  # best first
        iou = pairwise_iou(p.pred_boxes, p.pred_boxes).fill_diagonal_(0)
        assert (iou <= 0.7 + 1e-6).all()  # distinct: the proposal NMS at IoU 0.7
        torch.testing.assert_close(p.scores, p.class_scores.amax(1))
        boxes = xyzr_to_xyxy(xyzr[i])
        expected = p.pred_boxes.tensor.clone()
        expected[:, 2:] = torch.maximum(expected[:, 2:], expected[:, :2] + 1)
        torch.testing.assert_close(boxes[:n], expected, atol=1e-3, rtol=1e-4)
        whole_image = torch.tensor([[0.0, 0.0, w, h]]).expand(8 - n, 4)
        torch.testing.assert_close(boxes[n:], whole_image, atol=1e-3, rtol=0)


def test_each_inference_source_from_one_checkpoint():
    """``decoder`` and ``dense`` return each head's detections; ``both`` returns the two of them, from one
    forward, as ``instances`` and ``dense_instances``."""
    model = _model().eval()
    batch = _inputs()
    with torch.no_grad():
        decoder_out = model(batch)
        model.inference_source = "dense"
        dense_out = model(batch)
        model.inference_source = "both"
        both_out = model(batch)
    for out, (h, w) in zip(decoder_out, [(96, 128), (80, 112)]):
        inst = out["instances"]
        assert len(inst) == 50  # top-k over (query, class) pairs: 8 queries x 8 classes >= 50
        boxes = inst.pred_boxes.tensor
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
        assert out["steps"].item() >= 1 and out["residuals"].shape == (3,)
    for out in dense_out:
        assert "steps" not in out and isinstance(out["instances"], Instances)
    for both, decoder, dense in zip(both_out, decoder_out, dense_out):
        assert set(both) == set(decoder) | {"dense_instances"}
        for key, expected in (("instances", decoder["instances"]), ("dense_instances", dense["instances"])):
            torch.testing.assert_close(both[key].pred_boxes.tensor, expected.pred_boxes.tensor)
            torch.testing.assert_close(both[key].scores, expected.scores)
            assert torch.equal(both[key].pred_classes, expected.pred_classes)
        n = len(both["instances"])
        assert not torch.equal(both["instances"].scores, both["dense_instances"].scores[:n])


def test_decoder_nms_removes_same_class_overlaps_and_keeps_the_rest():
    """DECODER_NMS_THRESH 0.5: the detections are the no-NMS ones minus those a higher-scored detection
    of the same class overlaps by IoU > 0.5 (checked pair by pair); 1.0 (default) is no NMS."""
    model = _model().eval()
    assert model.decoder_nms_thresh == 1.0
    batch = _inputs()
    with torch.no_grad():
        plain = model(batch)
        model.decoder_nms_thresh = 0.5
        filtered = model(batch)
    for a, b in zip(plain, filtered):
        a, b = a["instances"], b["instances"]
        iou = pairwise_iou(a.pred_boxes, a.pred_boxes)
        same = a.pred_classes[:, None] == a.pred_classes[None, :]
        # greedy: walk best first, drop what a kept same-class detection overlaps
        kept = []
        for i in range(len(a)):
            if not any(same[i, j] and iou[i, j] > 0.5 for j in kept):
                kept.append(i)
        assert 0 < len(kept) < len(a)
        torch.testing.assert_close(b.scores, a.scores[kept])
        torch.testing.assert_close(b.pred_boxes.tensor, a.pred_boxes.tensor[kept])


RETINANET = ["MODEL.DENSE_QUERY.DENSE_DETECTOR", "RetinaNet", "MODEL.RETINANET.NUM_CLASSES", "8",
             "MODEL.ANCHOR_GENERATOR.SIZES", "[[32, 40], [64, 80], [128, 160], [256, 320], [512, 640]]"]


@pytest.mark.parametrize("name, opts", [("ATSS", []), ("RetinaNet", RETINANET)])
def test_dense_source_is_exactly_the_dense_detector(name, opts):
    """The dense detector is unchanged: same weights, same detections as its own meta-architecture."""
    model = _model(*opts).eval()
    model.inference_source = "dense"
    alone = build_model(build_config(CONFIG, SMALL + opts + ["MODEL.META_ARCHITECTURE", name])).eval()
    alone.load_state_dict(model.dense.state_dict())
    assert {k.split(".")[0] for k in model.state_dict()} == {"dense", "queries", "decoder", "content_proj"}
    batch = _inputs()
    with torch.no_grad():
        ours, theirs = model(batch), alone(batch)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["instances"].pred_boxes.tensor, b["instances"].pred_boxes.tensor)
        torch.testing.assert_close(a["instances"].scores, b["instances"].scores)


def test_retinanet_dense_detector_trains_and_seeds_the_queries():
    model = _model(*RETINANET)
    assert type(model.dense).__name__ == "RetinaNet" and model.num_classes == 8
    with EventStorage(0):
        losses = model(_inputs())
    assert {"dense_loss_cls", "dense_loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.dense.head.cls_score.weight.grad.abs().sum() > 0
    model.eval()
    batch = _inputs()
    with torch.no_grad():
        inputs, dense_features, _, outputs = model._forward_parts(batch)
        proposals = model.dense_proposals(inputs.images, dense_features, outputs)
        xyzr = inputs.xyzr
    # the first queries start at RetinaNet's distinct top boxes (no centerness: scores are class
    # probabilities)
    for i, p in enumerate(proposals):
        torch.testing.assert_close(xyzr_to_xyxy(xyzr[i, : len(p)]), p.pred_boxes.tensor, atol=1e-3, rtol=0)
        assert (p.scores <= 1).all() and (p.scores[:-1] >= p.scores[1:]).all()


def test_unknown_dense_detector_and_class_mismatch_name_the_key():
    with pytest.raises(ValueError, match="MODEL.DENSE_QUERY.DENSE_DETECTOR"):
        _model("MODEL.DENSE_QUERY.DENSE_DETECTOR", "FCOS")
    # two heads' counts set apart: one line naming both (deqdet.data.class_count)
    with pytest.raises(UserInputError, match="MODEL.QUERY.NUM_CLASSES 5, MODEL.RETINANET.NUM_CLASSES 8"):
        _model(*RETINANET[:2], "MODEL.QUERY.NUM_CLASSES", "5", "MODEL.RETINANET.NUM_CLASSES", "8")


def test_class_prior_adds_the_dense_log_odds():
    model = _model().eval()
    batch = _inputs()
    with torch.no_grad():
        inputs, dense_features, _, outputs = model._forward_parts(batch)
        content, xyzr, prior = model._queries(inputs.images, dense_features, outputs)
        proposals = model.dense_proposals(inputs.images, dense_features, outputs)
    for i, p in enumerate(proposals):
        torch.testing.assert_close(prior[i, : len(p)].sigmoid(), p.class_scores.clamp(1e-4, 1 - 1e-4))
        assert torch.allclose(prior[i, len(p):].sigmoid(), torch.tensor(1e-4))
    # what tools see is what forward adds
    torch.testing.assert_close(model.initial_queries(batch).prior, prior)


@pytest.mark.parametrize("decoder", ["AdaMixerDecoder", "DEQDecoder"])
def test_either_query_decoder(decoder):
    model = _model("MODEL.QUERY.DECODER", decoder, "MODEL.QUERY.NUM_STAGES", "2")
    model.train()
    with EventStorage(0):
        losses = model(_inputs())
    prefix = "s1_" if decoder == "AdaMixerDecoder" else "iter2_"
    assert any(k.startswith(prefix) for k in losses)
    sum(losses.values()).backward()


def test_papers_configs_keep_their_meta_architectures():
    expected = {"deqdet_r50_1x.yaml": "QueryDetector", "adamixer_r50_1x.yaml": "QueryDetector",
                "dyhead_r50_atss_fpn_1x.yaml": "ATSS", "dyhead_r50_retina_fpn_1x.yaml": "RetinaNet"}
    for name, arch in expected.items():
        cfg = build_config(os.path.join(ROOT, "configs", name))
        assert cfg.MODEL.META_ARCHITECTURE == arch, name


def test_coco_config_trains_a_step_and_infers():
    torch.manual_seed(0)
    cfg = build_config(os.path.join(ROOT, "configs", "deqdet_dyhead_r50_1x.yaml"), [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.DEQDET.REFINEMENT_STEPS", "2",
        "MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 2)", "MODEL.DEQDET.MAX_ITERS", "2",
        "MODEL.QUERY.NUM_QUERIES", "20"])  # the config's 100 queries: five times the decoder's time
    model = build_model(cfg)
    assert isinstance(model, DenseQueryDetector) and len(model.backbone.dyhead_tower) == 6
    assert model.decoder.refine_stage.strides == (8, 16, 32, 64)
    model.train()
    with EventStorage(0):
        losses = model(_inputs())
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad[:5]  # every trainable parameter takes part in the loss
    model.eval()
    with torch.no_grad():
        out = model([{k: v for k, v in x.items() if k != "instances"} for x in _inputs()])
    # the decoder's class-wise NMS leaves at most 100; the dense head's detections come along
    assert 0 < len(out[0]["instances"]) <= 100 and out[0]["steps"].item() == 3
    assert "dense_instances" in out[0]


def test_decoder_feature_grad_scales_what_the_decoder_sends_into_the_pyramid():
    no_rap = ["MODEL.DEQDET.PERTURB_CONTENT_PROB", "0.0", "MODEL.DEQDET.PERTURB_POSITION_PROB", "0.0"]
    grads, values = {}, {}
    for scale in ("1.0", "0.25", "0.0"):
        model = _model("MODEL.DENSE_QUERY.DECODER_FEATURE_GRAD", scale, *no_rap)
        model.train()
        with EventStorage(0):
            losses = model(_inputs())
        # the decoder's losses only
        sum(v for k, v in losses.items() if not k.startswith("dense_")).backward()
        values[scale] = {k: v.item() for k, v in losses.items()}
        grads[scale] = model.backbone.backbone.bottom_up.stem.conv1.weight.grad
    assert values["0.25"] == pytest.approx(values["1.0"]) and values["0.0"] == pytest.approx(values["1.0"])
    assert grads["1.0"].abs().sum() > 0 and grads["0.0"] is None
    torch.testing.assert_close(grads["0.25"], 0.25 * grads["1.0"], atol=1e-7, rtol=1e-3)


@pytest.mark.parametrize("opts", [[], RETINANET])
def test_a_training_step_computes_the_dense_anchors_once(opts, monkeypatch):
    """The dense head's anchors and per-level predictions are made once per step and serve both its
    losses and the proposals that seed the queries."""
    model = _model(*opts)
    calls = []
    generator = model.dense.anchor_generator
    original = generator.forward
    monkeypatch.setattr(generator, "forward", lambda features: calls.append(1) or original(features))
    with EventStorage(0):
        model(_inputs())
    assert len(calls) == 1


def test_coco_config_is_the_shapes_flagships_combined_detector():
    """One combined detector: the COCO config's wiring and matching are those of the flagship trained from
    a trained backbone (its shapes analogue)."""
    coco = build_config(os.path.join(ROOT, "configs", "deqdet_dyhead_r50_1x.yaml"))
    finetune = os.path.join(ROOT, "configs", "shapes", "retinanet_dyhead_deqdet_r18_finetune.yaml")
    shapes = build_config(finetune)
    assert coco.MODEL.DENSE_QUERY == shapes.MODEL.DENSE_QUERY
    assert coco.MODEL.META_ARCHITECTURE == shapes.MODEL.META_ARCHITECTURE == "DenseQueryDetector"
    for key in ("DECODER", "QUALITY_WEIGHT", "MATCHES_PER_GT"):
        assert coco.MODEL.QUERY[key] == shapes.MODEL.QUERY[key], key
