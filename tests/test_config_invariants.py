"""What a refactor must not change, for every shipped config: the model's state_dict keys and shapes,
and the losses of one seeded training step on a synthetic batch, against the values recorded in
``tests/fixtures/config_invariants.json`` (``python -m tests.test_config_invariants`` rewrites it;
do that only for a config whose model is meant to change, and say why in the commit)."""

import glob
import json
import os
import sys

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from deqdet.engine import build_config
from tests.helpers import FIXTURES, ROOT, synthetic_batch

FIXTURE = os.path.join(FIXTURES, "config_invariants.json")
CONFIGS = sorted(
    os.path.relpath(p, os.path.join(ROOT, "configs"))
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True)
    if not os.path.basename(p).startswith("Base-")
)


# The losses are those of the config with at most this many queries (the keys and shapes the config's own):
# a query decoder's step costs in proportion to its queries, and the R50 recipes have 100-300.
LOSS_QUERIES = 20


def _model(config: str, opts=()):
    torch.manual_seed(0)
    return build_model(build_config(os.path.join(ROOT, "configs", config), ["MODEL.DEVICE", "cpu", *opts]))


def record(config: str) -> dict:
    """{"keys": {name: shape}, "losses": {name: value}} of ``config`` built with seed 0 on the CPU,
    one training forward (seed 0) on two 96 x 128 synthetic images (at most ``LOSS_QUERIES`` queries)."""
    model = _model(config).train()
    keys = {k: list(v.shape) for k, v in model.state_dict().items()}
    queries = getattr(model, "queries", None)
    if queries is not None and queries.content.num_embeddings > LOSS_QUERIES:
        model = _model(config, ["MODEL.QUERY.NUM_QUERIES", str(LOSS_QUERIES)]).train()
    torch.manual_seed(0)
    with EventStorage(0):
        losses = model(synthetic_batch(2, seed=0, size=(96, 128)))
    return {"keys": keys, "losses": {k: v.item() for k, v in sorted(losses.items())}}


@pytest.fixture
def one_thread():
    """One intra-op thread, as the fixture was recorded (the order of float sums), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded() -> dict:
    with open(FIXTURE) as f:
        return json.load(f)


def test_every_shipped_config_is_recorded(recorded):
    assert sorted(recorded) == CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_and_seeded_step_losses_are_unchanged(config, recorded, one_thread):
    now = record(config)
    assert now["keys"] == recorded[config]["keys"]
    assert sorted(now["losses"]) == sorted(recorded[config]["losses"])
    for name, value in recorded[config]["losses"].items():
        assert now["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


if __name__ == "__main__":
    torch.set_num_threads(1)
    only = sys.argv[1:] or CONFIGS
    data = {}
    if os.path.isfile(FIXTURE):
        with open(FIXTURE) as f:
            data = json.load(f)
    for config in only:
        data[config] = record(config)
        print(config, data[config]["losses"], flush=True)
    data = {k: data[k] for k in CONFIGS}
    with open(FIXTURE, "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
        f.write("\n")
