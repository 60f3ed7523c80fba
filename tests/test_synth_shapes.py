"""The captioned shapes set and its checker: scenes are drawn alike from a seed, shapes lie apart and inside,
captions say what is drawn, held-out pairs stay out of training, the checker reads renders back right and
scores prompts that belong to other images near chance, and the folder is what jaxgen's folder source reads."""

import dataclasses
import json
import os

import numpy as np
import pytest

from jaxgen.data.images import open_images
from jaxgen.data.synth_shapes import (
    BACKGROUND,
    COLOURS,
    GAP,
    HELD_OUT,
    KINDS,
    MARGIN,
    SIZES,
    Prompt,
    Scene,
    Shape,
    draw_scene,
    holds_held_out,
    parse_caption,
    render,
    write_shapes_folder,
)
from jaxgen.errors import DataError
from jaxgen.quality.shape_checker import adherence, check, read_images

from helpers import tiny_dit_config


def scenes(split: str, n: int, seed: int = 1) -> list[Scene]:
    return [draw_scene(seed, split, i) for i in range(n)]


def test_captions_are_compositional_and_parse_back():
    prompt = Prompt((Shape("circle", "red", "small"), Shape("square", "blue", "large")), "above")
    assert prompt.caption() == "a small red circle above a large blue square"
    assert parse_caption("a small red circle above a large blue square") == prompt
    assert parse_caption("a large white cross") == Prompt((Shape("cross", "white", "large"),))
    for scene in scenes("train", 200) + scenes("test", 100):
        assert parse_caption(scene.prompt.caption()) == scene.prompt


def test_a_scene_is_drawn_alike_from_its_seed_and_its_shapes_lie_apart_inside_the_image():
    assert draw_scene(3, "train", 7) == draw_scene(3, "train", 7) != draw_scene(4, "train", 7)
    np.testing.assert_array_equal(render(draw_scene(3, "train", 7)), render(draw_scene(3, "train", 7)))
    drawn = scenes("train", 300)
    assert {len(s.prompt.shapes) for s in drawn} == {1, 2}
    for scene in drawn:
        boxes = [(x - SIZES[s.size], y - SIZES[s.size], x + SIZES[s.size], y + SIZES[s.size])
                 for s, (x, y) in zip(scene.prompt.shapes, scene.centres)]
        assert all(MARGIN - 1e-9 <= low and high <= 1 - MARGIN + 1e-9 for box in boxes for low, high in
                   ((box[0], box[2]), (box[1], box[3])))
        alone = [render(Scene(Prompt((shape,)), (centre,))) != BACKGROUND
                 for shape, centre in zip(scene.prompt.shapes, scene.centres)]
        for pixels in alone:  # nothing touches the border
            assert not (pixels[0].any() or pixels[-1].any() or pixels[:, 0].any() or pixels[:, -1].any())
        if len(boxes) == 2:
            (a, b), ((ax, ay), (bx, by)) = boxes, scene.centres
            apart = max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])
            assert apart >= GAP - 1e-9 and not (alone[0].any(-1) & alone[1].any(-1)).any()
            horizontal = abs(bx - ax) > abs(by - ay)
            assert horizontal == (scene.prompt.relation in ("left of", "right of"))
            assert scene.prompt.relation == {(True, True): "left of", (True, False): "right of",
                                             (False, True): "above", (False, False): "below"}[
                horizontal, (bx > ax) if horizontal else (by > ay)]


def test_held_out_pairs_appear_only_in_the_held_out_split():
    train, held_out = scenes("train", 2000), scenes("test", 300)
    assert not any(holds_held_out(s.prompt) for s in train)
    assert all(holds_held_out(s.prompt) for s in held_out)
    assert {(sh.colour, sh.kind) for s in held_out for sh in s.prompt.shapes} >= HELD_OUT
    trained = {(sh.colour, sh.kind) for s in train for sh in s.prompt.shapes}
    assert {c for c, _ in trained} == set(COLOURS) and {k for _, k in trained} == set(KINDS)


@pytest.mark.parametrize("size, n", [(32, 400), (64, 100)])
def test_the_checker_reads_renders_back_and_other_images_prompts_score_near_chance(size, n):
    drawn = scenes("train", n // 2) + scenes("test", n // 2)
    images = np.stack([render(s, size) for s in drawn])
    scores = adherence(images, [s.prompt.caption() for s in drawn])
    for attribute in ("count", "kind", "colour", "size", "relation", "prompt"):
        assert scores[attribute] >= 0.99, (attribute, scores)
    assert scores["chance"]["prompt"] < 0.1 and scores["chance"]["kind"] < 0.5, scores["chance"]
    for scene, shapes in zip(drawn, read_images(images[:50])):  # centres read back within a pixel
        assert len(shapes) == len(scene.centres)
        assert all(min(np.hypot(s.x - x, s.y - y) for s in shapes) < 1 / size for x, y in scene.centres)
    as_floats = images.astype(np.float32) / 127.5 - 1  # the models' range reads the same
    assert check(as_floats[:50], [s.prompt for s in drawn[:50]]) == check(images[:50], [s.prompt for s in drawn[:50]])


def test_the_checker_fails_a_wrong_shape_and_an_empty_image():
    scene = draw_scene(1, "train", 0)
    image = render(scene)[None]
    first = scene.prompt.shapes[0]
    other = KINDS[(KINDS.index(first.kind) + 1) % len(KINDS)]
    wrong = dataclasses.replace(scene.prompt, shapes=(dataclasses.replace(first, kind=other), *scene.prompt.shapes[1:]))
    [result] = check(image, [wrong])
    assert result["kind"][0] is False and result["colour"][0] and not result["prompt"]
    [empty] = check(np.full_like(image, BACKGROUND[0]), [scene.prompt])
    assert not (empty["count"] or empty["prompt"] or any(empty["kind"]))


def test_the_folder_is_read_by_the_folder_source_with_captions(tmp_path):
    out = tmp_path / "shapes"
    summary = write_shapes_folder(out, count=20, seed=5, held_out_fraction=0.25)
    assert (summary["train"], summary["test"]) == (15, 5) and len(summary["held_out"]) == len(HELD_OUT)
    assert [p.name for p in tmp_path.iterdir()] == ["shapes"]  # nothing half-built left beside it
    cfg = tiny_dit_config("images.source=folder", f"images.folder={out}", "model.image_size=32", "model.channels=3",
                          "model.num_classes=4")
    source = open_images(cfg)
    assert (source.size("train"), source.size("eval")) == (15, 5)
    for part, split in (("train", "train"), ("eval", "test")):
        for i in (0, 4):
            record, scene = source.parts[part][i], draw_scene(5, split, i)
            assert record["caption"] == scene.prompt.caption()
            assert record["label"] == KINDS.index(scene.prompt.shapes[0].kind)
            np.testing.assert_array_equal(record["image"], render(scene))
    row = json.loads((out / "test" / "metadata.jsonl").read_text().splitlines()[4])
    scene = draw_scene(5, "test", 4)
    assert row["relation"] == scene.prompt.relation and row["file_name"] == "000004.png"
    assert [Shape(o["kind"], o["colour"], o["size"]) for o in row["objects"]] == list(scene.prompt.shapes)
    np.testing.assert_allclose([(o["x"], o["y"]) for o in row["objects"]], scene.centres, atol=1e-5)


@pytest.mark.parametrize("arguments, says", [
    ({"count": 1}, "count=1: the shapes dataset needs at least 2 scenes"),
    ({"count": 10, "size": 16}, "size=16: shapes images must be at least 32 px"),
    ({"count": 10, "size": 100_000}, "size=100000: shapes images are at most 4096 px"),
    ({"count": 10**12}, r"--count 1,000,000,000,000 scenes of 32x32 px take about .* PB on disk \(.* each\), more "
                        r"than the .* free at .*; give at most [\d,]+$"),
    ({"count": 10, "held_out_fraction": 1.0}, "held_out_fraction=1.0 must lie strictly between 0 and 1"),
    ({"count": 10, "held_out_fraction": 0}, "held_out_fraction=0 must lie strictly between 0 and 1"),
])
def test_bad_arguments_are_refused_in_one_line(tmp_path, arguments, says):
    with pytest.raises(DataError, match=says) as refused:
        write_shapes_folder(tmp_path / "out", **arguments)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


def test_a_full_disk_is_not_told_to_give_at_most_0_scenes(tmp_path, monkeypatch):
    from jaxgen.data import synth_shapes

    real = os.statvfs(tmp_path)
    full = os.statvfs_result((real.f_bsize, real.f_frsize, real.f_blocks, 0, 0, *real[5:]))
    monkeypatch.setattr(synth_shapes.os, "statvfs", lambda path: full)
    with pytest.raises(DataError, match=r"more than the 0 B free at .*; free space there, or give --out elsewhere$"):
        write_shapes_folder(tmp_path / "out", count=200)


def test_an_existing_folder_and_a_foreign_caption_are_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists and is not an empty directory"):
        write_shapes_folder(tmp_path / "full", count=4)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="'a big red circle' is not 'a SIZE COLOUR KIND'"):
        parse_caption("a big red circle")
