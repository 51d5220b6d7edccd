"""DEQDecoder: memory-lean gradients equal the all-in-graph ones and keep one segment's activations,
RAP, inference schedule, tolerance, compiled inference steps, non-finite guard, config errors."""

import logging
import os

import pytest
import torch
from torch._dynamo.utils import counters

from deqdet.engine import build_config
from deqdet.memory import SavedTensorMeter
from deqdet.modeling.deq.perturb import RefinementPerturbation
from deqdet.modeling.query.boxes import xyxy_to_xyzr
from tests.helpers import NO_RAP, ROOT, config_file, jiggled, synthetic_batch, tiny_model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(actual, expected, name, rel=1e-4):
    """Equal up to float rounding, measured against the tensor's largest entry."""
    scale = expected.abs().max().clamp(min=1e-8)
    assert (actual - expected).abs().max() <= rel * scale, (name, (actual - expected).abs().max(), scale)


@pytest.fixture(scope="module")
def stash_and_plain():
    """The same weights twice: memory-lean (GRAD_STASH) and all-in-graph, RAP off."""
    stash = jiggled(tiny_model(*NO_RAP))
    plain = tiny_model(*NO_RAP, "MODEL.DEQDET.GRAD_STASH", "False")
    plain.load_state_dict(stash.state_dict())
    return stash, plain


def test_stashed_gradients_equal_the_all_in_graph_gradients(stash_and_plain):
    stash, plain = stash_and_plain
    batch = synthetic_batch()
    losses_s, losses_p = stash(batch), plain(batch)
    assert list(losses_s) == list(losses_p)
    assert any(k.startswith("iter6_") for k in losses_s) and any(k.startswith("init^2_") for k in losses_s)
    for k in losses_p:  # logged values are the true losses
        torch.testing.assert_close(losses_s[k].detach(), losses_p[k].detach(), rtol=1e-5, atol=1e-6)
    # Only one value carries the stashed segments (all of them, the init stage's included); the
    # other values are plain numbers.
    assert sum(v.requires_grad for v in losses_s.values()) == 1
    for model, losses in ((stash, losses_s), (plain, losses_p)):
        model.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
    gs, gp = _grads(stash), _grads(plain)
    assert set(gs) == set(gp) == {n for n, p in plain.named_parameters() if p.requires_grad}
    for name in gp:
        _assert_close(gs[name], gp[name], name)
    # The segments matter: the refinement stage's gradient is not that of the init losses alone.
    plain.zero_grad(set_to_none=True)
    sum(v for k, v in plain(batch).items() if k.startswith("init")).backward()
    name = "decoder.refine_stage.fc_cls.weight"
    assert (gp[name] - plain.decoder.refine_stage.fc_cls.weight.grad).abs().max() > 1e-3


def test_stash_follows_the_trainers_loss_scale(stash_and_plain):
    """A GradScaler-style scaled backward gets scale x the plain gradients, and the next iteration
    backpropagates its segments with the observed scale."""
    stash, plain = stash_and_plain
    batch = synthetic_batch(seed=3)
    plain.zero_grad(set_to_none=True)
    sum(plain(batch).values()).backward()
    expected = _grads(plain)
    for _ in range(2):
        stash.zero_grad(set_to_none=True)
        (1024.0 * sum(stash(batch).values())).backward()
        assert stash.decoder.get_loss_scale() == 1024.0
        for name, g in _grads(stash).items():
            _assert_close(g / 1024.0, expected[name], name)
    stash.decoder.set_loss_scale(1.0)


class _StageActivationMeter(SavedTensorMeter):
    """Saved-for-backward bytes of the decoder's stage calls alive at once (``peak``); parameters and
    the image features (shared by every stage) are not counted. ``unit``: the bytes one stage call
    saves (the first call with gradient)."""

    def __init__(self, model):
        super().__init__(skip=model.parameters())
        self.unit, self.in_stage, self.packed = None, False, 0
        model.neck.register_forward_hook(
            lambda m, a, out: self.skip.update(f.untyped_storage().data_ptr() for f in out))
        for stage in (model.decoder.init_stage, model.decoder.refine_stage):
            stage.register_forward_pre_hook(self._enter)
            stage.register_forward_hook(self._leave)

    def _enter(self, module, args):
        self.in_stage, self.packed = True, 0

    def _leave(self, module, args, out):
        self.in_stage = False
        if self.unit is None and self.packed:
            self.unit = self.packed

    def accepts(self, tensor):
        return self.in_stage

    def counted(self, nbytes):
        self.packed += nbytes


@pytest.mark.parametrize("stash, extra, stages", [
    ("True", 2, 3.0),    # init stage + its 2 applications of f, then one RAG segment (2) at a time
    ("True", 0, 2.0),    # one RAG segment at a time
    ("False", 2, 9.0),   # everything in one graph: 1 + 2 + 3 positions (the tiny config's) x RAG 2
])
def test_stash_keeps_one_segment_of_stage_activations_alive(stash, extra, stages):
    model = jiggled(tiny_model(*NO_RAP, "MODEL.DEQDET.GRAD_STASH", stash,
                               "MODEL.DEQDET.EXTRA_INIT_SUPERVISIONS", str(extra)))
    meter = _StageActivationMeter(model)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        losses = model(synthetic_batch())
    peak_in_stages = meter.peak / meter.unit
    assert stages - 0.25 <= peak_in_stages <= stages + 0.25, peak_in_stages
    sum(losses.values()).backward()


def test_rap_off_is_deterministic_and_rap_on_is_not():
    model = jiggled(tiny_model(*NO_RAP))
    batch = synthetic_batch()
    a, b = model(batch), model(batch)
    assert all(torch.equal(a[k], b[k]) for k in a)
    model.decoder.schedule.perturbation = RefinementPerturbation(1.0, 0.1, 1.0, 25.0)
    c = model(batch)
    assert all(torch.equal(a[k], c[k]) for k in a if k.startswith("init"))  # RAP only acts on refinement
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("iter"))


def test_rap_formulas():
    content = torch.randn(2, 5, 8)
    xyzr = xyxy_to_xyzr(torch.tensor([[[10.0, 20.0, 50.0, 60.0]]]).expand(2, 5, 4))
    rap = RefinementPerturbation(1.0, 0.1, 0.0, 0.0)
    torch.manual_seed(7)
    out_c, out_b, iof_boxes = rap(content, xyzr)
    torch.manual_seed(7)
    torch.rand(())
    eps = torch.randn_like(content)
    torch.testing.assert_close(out_c, 0.9 * content + 0.1 * content.norm(dim=-1, keepdim=True) * eps)
    assert torch.equal(out_b, xyzr) and iof_boxes is None


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_tol_zero_runs_the_official_number_of_steps():
    model = tiny_model("MODEL.DEQDET.MAX_ITERS", "20").eval()
    init_calls = _count_calls(model.decoder.init_stage)
    refine_calls = _count_calls(model.decoder.refine_stage)
    with torch.no_grad():
        out = model(synthetic_batch(3))
    assert len(init_calls) == 1 and len(refine_calls) == 21  # init, 20 iterations, 1 output step
    for r in out:
        assert int(r["steps"]) == 21
        assert r["residuals"].shape == (20,) and torch.isfinite(r["residuals"]).all()
        assert torch.isfinite(r["instances"].pred_boxes.tensor).all()


def test_init_test_output_answers_with_the_init_stage_alone():
    """MODEL.DEQDET.TEST_OUTPUT init: the init stage's prediction, no refinement step, 0 steps."""
    refined = jiggled(tiny_model("MODEL.DEQDET.MAX_ITERS", "3")).eval()
    init = jiggled(tiny_model("MODEL.DEQDET.MAX_ITERS", "3", "MODEL.DEQDET.TEST_OUTPUT", "init")).eval()
    refine_calls = _count_calls(init.decoder.refine_stage)
    batch = synthetic_batch(2)
    with torch.no_grad():
        queries = init.initial_queries(batch)
        expected = init.decoder.init_stage(queries.content, queries.xyzr, queries.features)
        got = init.decoder.predict(queries.content, queries.xyzr, queries.features)
        out, refined_out = init(batch), refined(batch)
    assert not refine_calls
    torch.testing.assert_close(got["logits"], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got["boxes"], expected.boxes, rtol=0, atol=0)
    assert got["steps"].tolist() == [0, 0] and got["residuals"].shape == (2, 0)
    for r, r_refined in zip(out, refined_out):
        assert int(r["steps"]) == 0 and int(r_refined["steps"]) == 4
        assert not torch.equal(r["instances"].pred_boxes.tensor, r_refined["instances"].pred_boxes.tensor)


def test_compiled_stage_equals_the_plain_stage():
    """MODEL.DEQDET.COMPILE: the inference steps through torch.compile give the plain stage's
    detections (float rounding: fused kernels sum in another order); training keeps the plain stage."""
    plain = jiggled(tiny_model("MODEL.DEQDET.MAX_ITERS", "3")).eval()
    compiled = tiny_model("MODEL.DEQDET.MAX_ITERS", "3", "MODEL.DEQDET.COMPILE", "True").eval()
    compiled.load_state_dict(plain.state_dict())
    assert not any(".compiled" in k or "_orig_mod" in k for k in compiled.state_dict())
    batch = synthetic_batch(2)
    with torch.no_grad():
        expected, actual = plain(batch), compiled(batch)
    assert compiled.decoder.inference.compiled_stage is not None
    assert plain.decoder.inference.compiled_stage is None
    for e, a in zip(expected, actual):
        assert int(a["steps"]) == int(e["steps"]) == 4
        e, a = e["instances"], a["instances"]
        torch.testing.assert_close(a.scores, e.scores, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.pred_boxes.tensor, e.pred_boxes.tensor, rtol=1e-4, atol=1e-3)
        assert torch.equal(a.pred_classes, e.pred_classes)
    frames = dict(counters["frames"])  # a grad-mode stage call through the compiled one would compile anew
    compiled.train()
    losses = compiled(batch)
    sum(losses.values()).backward()
    assert dict(counters["frames"]) == frames and all(torch.isfinite(v) for v in losses.values())


def test_tolerance_stops_each_image_early():
    model = tiny_model("MODEL.DEQDET.MAX_ITERS", "20").eval()
    batch = synthetic_batch(2)
    with torch.no_grad():
        full = model(batch)
        # A tolerance between the two images' residuals after the second iteration stops one of them.
        second = torch.stack([r["residuals"][1] for r in full])
        model.decoder.inference.tol = float(second.mean())
        early = model(batch)
    steps = [int(r["steps"]) for r in early]
    assert min(steps) <= 3 and steps[0] != steps[1], (steps, second)
    for r in early:
        k = int(r["steps"]) - 1
        assert torch.isfinite(r["residuals"][:k]).all() and torch.isnan(r["residuals"][k:]).all()
        assert r["residuals"][k - 1] < model.decoder.inference.tol or k == 20


def test_non_finite_state_stops_with_the_last_finite_state(caplog):
    model = tiny_model("MODEL.DEQDET.MAX_ITERS", "10").eval()
    stage = model.decoder.refine_stage
    calls = []

    def poison_image_1_from_call_4(module, args, output):
        calls.append(1)
        if len(calls) >= 4 and output.content.shape[0] == 2:
            output.content[1] = output.logits[1] = float("nan")  # part of the state, and the scores
        return output

    stage.register_forward_hook(poison_image_1_from_call_4)
    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = model(synthetic_batch(2))
    assert "non-finite state for images [1]" in caplog.text
    # Image 1: its 4th evaluation failed, so 4 evaluations + the output step; the output step (also
    # poisoned here) falls back to the init stage's prediction.
    assert int(out[0]["steps"]) == 11 and int(out[1]["steps"]) == 5
    assert "output step not finite for images [1]" in caplog.text
    assert torch.isnan(out[1]["residuals"][3:]).all() and torch.isfinite(out[1]["residuals"][:3]).all()
    for r in out:
        assert torch.isfinite(r["instances"].pred_boxes.tensor).all()
        assert torch.isfinite(r["instances"].scores).all()


@pytest.mark.parametrize(
    "opts, key",
    [
        (["MODEL.DEQDET.SUPERVISION_POSITIONS", "(1, 7)"], "SUPERVISION_POSITIONS"),
        (["MODEL.DEQDET.RAG", "-1"], "RAG"),
        (["MODEL.DEQDET.TOL", "-0.01"], "TOL"),  # the solver loops trust the decoder's checks
        (["MODEL.DEQDET.MAX_ITERS", "-1"], "MAX_ITERS"),
        (["MODEL.DEQDET.TEST_OUTPUT", "'first'"], "TEST_OUTPUT"),
        (["MODEL.DEQDET.PERTURB_CONTENT_PROB", "1.5"], "PERTURB_CONTENT_PROB"),
    ],
)
def test_bad_config_names_the_key(opts, key):
    with pytest.raises(ValueError, match=key):
        tiny_model(*opts)


@pytest.mark.parametrize(
    "config,queries,crop",
    [("configs/deqdet_r50_1x.yaml", 100, False), ("configs/deqdet_r50_2x.yaml", 300, True),
     ("configs/shapes/deqdet_r18.yaml", 50, False)],
)
def test_deqdet_configs(config, queries, crop):
    """The recipes carry the official DEQDet settings (shapes: the documented CPU schedule)."""
    cfg = build_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu"])
    q, d = cfg.MODEL.QUERY, cfg.MODEL.DEQDET
    expected = ("DEQDecoder", "DEQDet", queries, crop)
    assert (q.DECODER, q.NECK_STYLE, q.NUM_QUERIES, cfg.INPUT.DETR_CROP.ENABLED) == expected
    assert (d.RAG, d.EXTRA_INIT_SUPERVISIONS, d.TOL, d.PERTURB_POSITION_INTENSITY) == (2, 2, 0.0, 25.0)
    if "shapes" in config:
        assert (d.REFINEMENT_STEPS, tuple(d.SUPERVISION_POSITIONS), d.MAX_ITERS) == (6, (1, 3, 6), 6)
        assert q.IN_POINTS == build_config(config_file("shapes", "adamixer_r18.yaml")).MODEL.QUERY.IN_POINTS
    else:
        schedule = (d.REFINEMENT_STEPS, tuple(d.SUPERVISION_POSITIONS), d.MAX_ITERS)
        assert schedule == (20, (1, 3, 6, 9, 12, 20), 20)
        sampling_and_solver = (q.IN_POINTS, q.OUT_POINTS, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY)
        assert sampling_and_solver == (64, 128, 2.5e-5, 0.01)
        assert [tuple(rule) for rule in cfg.SOLVER.PARAM_GROUP_RULES] == [(r"^decoder\.", 4.0, 10.0)]


def test_solver_on_a_linear_contraction():
    """z = A z + b with ||A|| = 0.9: the iteration reaches the exact fixed point, and its recorded
    residual ends under the tolerance, and only there."""
    from deqdet.modeling.deq.solver import solve

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    a = 0.9 * q  # a rotation-like contraction: the plain iteration converges slowly
    b = torch.randn(3, 8, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - a, b.T).T

    def f(z, index):
        return z @ a.T + b[index]

    result = solve(f, b.clone(), tol=1e-6, max_iters=400)
    torch.testing.assert_close(result.state, exact, rtol=1e-4, atol=1e-4)
    assert (result.iterations < 400).all()
    for i, k in enumerate(result.iterations.tolist()):
        r = result.residuals[i]
        assert r[k - 1] < 1e-6 <= r[: k - 1].min() and torch.isnan(r[k:]).all()
