"""tools/predict.py, tools/export.py, tools/convert_official.py errors, `make help`: each with a good
and a bad input."""

import os
import subprocess

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import DENSE_QUERY_CONFIG, ROOT, SHAPES_CONFIG, TINY, TINY_DENSE_QUERY, config_file

DEQ_OPTS = [*TINY, "MODEL.DEQDET.MAX_ITERS", "2"]
ATSS_CONFIG = config_file("shapes", "atss_dyhead_r18.yaml")
ATSS_OPTS = (
    "MODEL.DEVICE cpu MODEL.RESNETS.STEM_OUT_CHANNELS 16 MODEL.RESNETS.RES2_OUT_CHANNELS 16 "
    "MODEL.FPN.OUT_CHANNELS 32 MODEL.ATSS.INFERENCE_TH 0.0"
).split()


@pytest.fixture()
def images(tmp_path):
    """A folder with an RGBA PNG, a grayscale JPEG and a file that is not an image."""
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (70, 90, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (80, 60), dtype=np.uint8), "L").save(folder / "gray.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG but not really")
    return folder


def test_predict_draws_every_readable_image_and_names_the_broken_one(images, tmp_path, capsys):
    from tools.predict import main

    out = tmp_path / "out"
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--input",
                str(images),
                "--output",
                str(out),
                "--confidence-threshold",
                "0.0",
                "--opts",
                *DEQ_OPTS,
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert sorted(os.listdir(out)) == ["gray.png", "rgba.png"]
    assert cv2.imread(str(out / "gray.png")).shape[:2] == (80, 60)  # drawn at the input's size
    assert "broken.png" in captured.err and "1 of 3 inputs could not be read" in captured.err
    assert not any(line.startswith("error:") for line in captured.err.splitlines())  # skipped, not an error
    assert "gray.jpg: 50 detections" in captured.out  # threshold 0: all TEST.DETECTIONS_PER_IMAGE (50)


def test_predict_single_file_output_and_bad_inputs(images, tmp_path, capsys):
    from tools.predict import main

    target = tmp_path / "one" / "drawn.png"
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--input",
                str(images / "rgba.png"),
                "--output",
                str(target),
                "--opts",
                *DEQ_OPTS,
            ]
        )
        == 0
    )
    assert target.is_file()
    assert (
        main(["--config-file", SHAPES_CONFIG, "--input", str(tmp_path / "nope*.jpg"), "--opts", *DEQ_OPTS])
        == 1  # nothing could be read
    )
    err = capsys.readouterr().err
    assert f"skipped {tmp_path / 'nope*.jpg'}: no such file" in err
    assert "1 of 1 inputs could not be read" in err
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--input",
                str(images / "rgba.png"),
                "--opts",
                *DEQ_OPTS,
                "MODEL.WEIGHTS",
                str(tmp_path / "missing.pth"),
            ]
        )
        == 2
    )
    assert "missing.pth" in capsys.readouterr().err


def test_predict_names_and_skips_a_missing_input(images, tmp_path, capsys):
    from tools.predict import main

    missing, broken = tmp_path / "missing.png", images / "broken.png"
    out = tmp_path / "out"
    inputs = [str(missing), str(images / "rgba.png"), str(broken)]
    args = ["--config-file", SHAPES_CONFIG, "--input", *inputs, "--output", str(out), "--opts", *DEQ_OPTS]
    assert main(args) == 0  # the readable image is drawn
    captured = capsys.readouterr()
    assert os.listdir(out) == ["rgba.png"]
    assert f"skipped {missing}: no such file" in captured.err
    assert f"skipped {broken}: cannot read image" in captured.err
    assert "2 of 3 inputs could not be read" in captured.err
    assert not any(line.startswith("error:") for line in captured.err.splitlines())


def test_predict_video(tmp_path, capsys):
    from tools.predict import main

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    out = tmp_path / "drawn.mp4"
    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--video-input",
                str(video),
                "--output",
                str(out),
                "--opts",
                *DEQ_OPTS,
            ]
        )
        == 0
    )
    drawn = cv2.VideoCapture(str(out))
    assert int(drawn.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    (tmp_path / "text.mp4").write_text("not a video")
    assert (
        main(
            ["--config-file", SHAPES_CONFIG, "--video-input", str(tmp_path / "text.mp4"), "--opts", *DEQ_OPTS]
        )
        == 2
    )
    assert "text.mp4" in capsys.readouterr().err


@pytest.mark.parametrize(
    "config, opts",
    [(SHAPES_CONFIG, DEQ_OPTS), (ATSS_CONFIG, ATSS_OPTS), (DENSE_QUERY_CONFIG, TINY_DENSE_QUERY)],
    ids=["deqdet", "atss_dyhead", "dense_query_deq"],
)
def test_exported_torchscript_equals_eager(config, opts, tmp_path):
    from deqdet.inference import build_inference_model
    from tools.export import adapter_for, check_torchscript, export_config, export_torchscript, sample_input

    torch.manual_seed(0)
    cfg = export_config(config, opts)
    model, _ = build_inference_model(cfg)
    image, other = sample_input(cfg, None, (96, 128)), sample_input(cfg, None, (96, 128), seed=1)
    path = str(tmp_path / "m.ts")
    export_torchscript(model, image, path)
    eager = adapter_for(model, other)
    outputs = eager(*eager.flattened_inputs)
    assert outputs[0].shape[0] > 0  # there are detections to compare
    assert check_torchscript(model, path, [image, other]) == [0.0, 0.0]


def test_export_cli_bad_input(tmp_path, capsys):
    from tools.export import main

    assert (
        main(
            [
                "--config-file",
                SHAPES_CONFIG,
                "--output",
                str(tmp_path / "m"),
                "--input",
                str(tmp_path / "missing.jpg"),
                "--opts",
                *DEQ_OPTS,
            ]
        )
        == 2
    )
    assert "missing.jpg" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"plain text, no pickle", "cannot read checkpoint")],
    ids=["empty", "not_a_checkpoint"],
)
def test_convert_official_unreadable_input_is_one_line(tmp_path, capsys, content, message):
    from tools.convert_official import main

    src = tmp_path / "in.pth"
    src.write_bytes(content)
    assert main(["--source", "deqdet", str(src), str(tmp_path / "out.pth")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(src) in err and message in err


def test_convert_official_missing_output_folder_fails_before_reading(tmp_path, capsys):
    from tools.convert_official import main

    missing = tmp_path / "no" / "such" / "folder"
    # the input does not exist either: the output folder is checked first, before any work
    assert main(["--source", "dyhead", str(tmp_path / "in.pth"), str(missing / "out.pth")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_make_help_lists_the_targets():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for target in ("demo", "test", "setup", "help"):
        assert f"make {target} " in out
