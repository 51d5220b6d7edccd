"""The training data stream: the same batches, grouping and augmentation draws whatever the number
of DataLoader workers and wherever it is resumed; the main process's random streams untouched."""

import itertools
import random

import numpy as np
import pytest
import torch

from deqdet.data.stream import BatchStream, build_stream_loader

UNREADABLE = 5


def _records(n=23):
    """Records with every fourth image in portrait orientation."""
    return [{"index": i, "width": 40 if i % 4 == 0 else 60, "height": 50} for i in range(n)]


def _augment(record):
    """A mapper drawing from all three global random streams; image UNREADABLE cannot be read."""
    if record["index"] == UNREADABLE:
        return None
    return {"index": record["index"], "portrait": record["width"] < record["height"],
            "draws": (random.random(), float(np.random.rand()), float(torch.rand(1)))}


def _batches(workers, start=0, count=12, grouping=True):
    stream = BatchStream(_records(), _augment, batch_size=3, seed=11, aspect_ratio_grouping=grouping)
    stream.resume(11, start)
    return list(itertools.islice(build_stream_loader(stream, workers), count))


def test_batches_do_not_depend_on_workers_or_resume_point():
    uninterrupted = _batches(workers=0, count=14)
    for workers in (1, 2):
        assert _batches(workers) == uninterrupted[:12], workers
    for workers, start in ((0, 5), (1, 3), (2, 3), (2, 4)):
        assert _batches(workers, start=start, count=14 - start) == uninterrupted[start:], (workers, start)


def test_grouping_and_unreadable_images():
    grouped = _batches(workers=0, count=30)
    assert all(len({d["portrait"] for d in batch}) == 1 for batch in grouped)
    assert any(batch[0]["portrait"] for batch in grouped)
    indices = [d["index"] for batch in grouped for d in batch]
    assert UNREADABLE not in indices and set(indices) == set(range(23)) - {UNREADABLE}
    plain = _batches(workers=0, count=30, grouping=False)
    assert any(len({d["portrait"] for d in batch}) == 2 for batch in plain)
    draws = [d["draws"] for batch in plain for d in batch]
    assert len(set(draws)) == len(draws)  # every image draws its own numbers


def test_main_process_random_streams_are_left_alone():
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    _batches(workers=0, count=4)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_resume_position_must_not_be_negative():
    with pytest.raises(ValueError, match="start must be >= 0"):
        BatchStream(_records(), _augment, batch_size=2, seed=0).resume(0, -1)
