"""Images users have: a folder of PNG/JPEG files (class sub-folders or metadata.jsonl, split folders or not)
and MNIST-format IDX files (Fashion-MNIST), through the same grain pipeline; one clear line per bad input."""

import gzip
import json
import logging
import os
import pathlib
import warnings

import numpy as np
import pytest
from PIL import Image

from jaxgen.data.idx_images import read_idx
from jaxgen.data.image_batches import held_out_batches, train_batches
from jaxgen.data.images import open_images
from jaxgen.data.splits import Shard
from jaxgen.errors import CheckpointError, ConfigError, DataError

from helpers import DIT_CONFIG, assert_resumes_exactly, jaxgen_cli, run_jaxgen, tiny_dit_config

FASHION_MNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def pixels(i: int, size: int = 8, channels: int = 1) -> np.ndarray:
    """Random pixels with the image number in the top-left corner."""
    image = np.random.default_rng(i).integers(0, 256, (size, size, channels), dtype=np.uint8)
    image[0, 0] = i
    return image


def save_png(path: pathlib.Path, image: np.ndarray) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def config(*overrides: str):
    return tiny_dit_config("data.batch_size=4", "images.eval_every_nth=5", *overrides)


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """30 grey 8x8 images in 3 class folders (names sorted: ant=0, bee=1, cat=2)."""
    root = tmp_path_factory.mktemp("classes")
    for i in range(30):
        save_png(root / ["bee", "cat", "ant"][i % 3] / f"{i:02d}.png", pixels(i))
    return root


def test_class_folders_give_their_pixels_and_sorted_labels(class_folders):
    cfg = config("images.source=folder", f"images.folder={class_folders}", "images.resize=false")
    source = open_images(cfg)
    assert (source.size("train"), source.size("eval")) == (24, 6)  # every 5th held out
    train = [source.parts["train"][i] for i in range(24)]
    for record in train:
        i = int(record["image"][0, 0, 0])
        np.testing.assert_array_equal(record["image"], pixels(i))  # PNG is lossless
        assert record["label"] == {"ant": 0, "bee": 1, "cat": 2}[["bee", "cat", "ant"][i % 3]]


def test_images_of_kinds_not_read_are_named_not_skipped_silently(class_folders, tmp_path, caplog):
    """A class folder of .webp and .bmp files beside its PNGs trained on the PNGs alone, without a word."""
    import shutil

    root = tmp_path / "mixed"
    shutil.copytree(class_folders, root)
    for i, suffix in enumerate([".webp", ".webp", ".bmp"]):
        Image.fromarray(pixels(40 + i)[..., 0]).save(root / "ant" / f"{40 + i}{suffix}")
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        source = open_images(config("images.source=folder", f"images.folder={root}", "images.resize=false"))
    assert source.size("train") + source.size("eval") == 30
    assert f"images.folder {root}: 2 .webp, 1 .bmp files not read (only PNG and JPEG images are)" in caplog.text


def test_hidden_files_and_folders_in_a_class_folder_are_passed_over(class_folders, tmp_path):
    """A copy from a Mac leaves `._0.png` (AppleDouble metadata, not an image) beside each image: it was counted as
    an image and stopped the run when its batch came up, after checkpoints had been written."""
    import shutil

    root = tmp_path / "from_a_mac"
    shutil.copytree(class_folders, root)
    (root / "ant" / "._00.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    save_png(root / "bee" / ".thumbnails" / "01.png", pixels(1))
    source = open_images(config("images.source=folder", f"images.folder={root}", "images.resize=false"))
    assert source.size("train") + source.size("eval") == 30


def test_folder_batches_resume_exactly_and_hold_out_each_image_once(class_folders):
    cfg = config("images.source=folder", f"images.folder={class_folders}", "images.hflip=true")
    assert_resumes_exactly(lambda: train_batches(open_images(cfg), cfg, Shard()), consumed=9, following=4)
    held_out = held_out_batches(open_images(cfg), 4, 10, Shard())
    firsts = [int(round((b["images"][r, 0, 0, 0] + 1) / 2 * 255)) for b in held_out for r in range(4) if b["weights"][r]]
    files = sorted(class_folders.rglob("*.png"))  # by class, then name: the order images are numbered in
    assert firsts == [int(f.stem) for f in files[4::5]]  # ordinals 4, 9, ...: each held-out image once


def test_metadata_jsonl_gives_labels_by_name_and_captions_and_split_folders_are_the_parts(tmp_path):
    for split, count in (("train", 12), ("test", 4)):
        lines = []
        for i in range(count):
            save_png(tmp_path / split / "img" / f"{i}.png", pixels(i, 12, 3))
            lines.append({"file_name": f"img/{i}.png", "label": ["dog", "cat"][i % 2], "text": f"picture {i}"})
        (tmp_path / split / "metadata.jsonl").write_text("\n".join(map(json.dumps, lines)) + "\n")
    cfg = config("images.source=folder", f"images.folder={tmp_path}", "model.channels=3", "model.num_classes=2")
    source = open_images(cfg)
    assert (source.size("train"), source.size("eval")) == (12, 4)
    record = source.parts["eval"][3]
    assert (record["label"], record["caption"]) == (0, "picture 3")  # cat=0, dog=1
    assert record["image"].shape == (8, 8, 3)  # 12x12 scaled to model.image_size


def test_resize_scales_the_shorter_side_and_crops_the_centre(tmp_path):
    image = np.zeros((16, 24, 1), np.uint8)  # 16 high, 24 wide: the centre 16x16 is white
    image[:, 4:20] = 255
    save_png(tmp_path / "a" / "wide.png", image)
    for i in range(4):
        save_png(tmp_path / "a" / f"{i}.png", pixels(i))
    cfg = config("images.source=folder", f"images.folder={tmp_path}", "images.eval_every_nth=2")
    record = open_images(cfg).parts["train"][2]  # sorted 0, 1, 2, 3, wide: 1 and 3 held out
    assert record["image"].shape == (8, 8, 1) and record["image"].min() > 200  # only the white centre is kept


@pytest.mark.parametrize("damage, says", [
    ("truncated", "cannot be read"),
    ("not an image", "cannot be read"),
    ("wrong size", "is 6x6, not model.image_size=8 square; set images.resize=true"),
])
def test_a_bad_image_is_named_or_skipped_when_asked(class_folders, tmp_path, damage, says, caplog):
    import shutil

    root = tmp_path / "imgs"
    shutil.copytree(class_folders, root)
    bad = root / "ant" / "02.png"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:40])
    elif damage == "not an image":
        bad.write_text("hello")
    else:
        save_png(bad, pixels(2, 6))
    cfg = config("images.source=folder", f"images.folder={root}", "images.resize=false")
    source = open_images(cfg)
    index = next(i for i in range(source.size("train")) if source.parts["train"].ordinal(i) == 0)  # ant/02.png
    with pytest.raises(DataError, match=rf"image '{bad}' {says}") as err:
        source.parts["train"][index]
    assert "\n" not in str(err.value)
    skipping = open_images(config("images.source=folder", f"images.folder={root}", "images.resize=false",
                                  "images.bad_images=skip"))
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        record = skipping.parts["train"][index]
        skipping.parts["train"][index]  # read again, as every epoch does: named once
    assert int(record["image"][0, 0, 0]) == 5  # the next file of its part (ant/05.png)
    assert caplog.text.count(f"skipped: image '{bad}'") == 1


def test_a_folder_of_unreadable_images_names_the_folder_over_every_class(class_folders, tmp_path):
    """It named the first class folder alone, though every class's images had been tried."""
    import shutil

    root = tmp_path / "all_bad"
    shutil.copytree(class_folders, root)
    for image in root.rglob("*.png"):
        image.write_text("not a png")
    source = open_images(config("images.source=folder", f"images.folder={root}", "images.bad_images=skip"))
    with pytest.raises(DataError, match=rf"^none of the 30 images under {root} can be read \(images.bad_images=skip "
                                        r"passed over each one\)$"):
        source.parts["train"][0]


def test_sixteen_bit_images_are_scaled_to_eight_bits_not_saturated(tmp_path):
    """A 16-bit grey PNG (Pillow mode I;16) came out [0, 1, 1, 1, ...]: Pillow's conversion clips it at 255."""
    from jaxgen.data.folder_images import read_image_files

    gradient = np.arange(64, dtype=np.uint16).reshape(8, 8) * 4 * 257  # 8-bit 0, 4, ..., 252 in 16 bits
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    for channels in (1, 3):
        [image] = read_image_files([str(tmp_path / "deep.png")], 8, channels, resize=False)
        eight_bits = np.round((image + 1) * 127.5).astype(int)
        assert image.shape == (8, 8, channels) and (eight_bits == (gradient // 257)[..., None]).all()


def test_a_photo_is_read_upright_as_its_exif_orientation_says(tmp_path):
    """Phones store a portrait photo sideways with an EXIF orientation tag: it was trained on sideways."""
    from jaxgen.data.folder_images import read_image_files

    stored = np.zeros((16, 16), np.uint8)
    stored[:8] = 255  # the top half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: the white half on the right
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=100, exif=exif)
    Image.fromarray(stored).save(tmp_path / "plain.jpg", quality=100)
    photo, plain = read_image_files([str(tmp_path / "photo.jpg"), str(tmp_path / "plain.jpg")], 16, 1)[..., 0]
    assert photo[:, 8:].mean() > 0.9 and photo[:, :8].mean() < -0.9  # in the model's range, [-1, 1]
    assert plain[:8].mean() > 0.9 and plain[8:].mean() < -0.9


def test_a_pipe_or_an_image_too_large_to_decode_is_named_before_it_is_read(tmp_path, monkeypatch):
    """A named pipe hung `sample --images` for ever; a huge PNG ended in 'unexpected DecompressionBombError'."""
    from PIL import Image as PILImage

    from jaxgen.data.folder_images import open_image, read_image_files

    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DataError, match=rf"^image '{tmp_path / 'fifo.png'}' is not a regular file \(a pipe, device or "
                                        r"folder\); give image files$"):
        open_image(tmp_path / "fifo.png")
    with pytest.raises(DataError, match=r"is not a regular file \(a pipe, device or folder\); give image files$"):
        read_image_files([str(tmp_path / "fifo.png")], 8, 1)  # as the folder source and `sample --images` read
    save_png(tmp_path / "big.png", pixels(0, 40))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)  # 40x40 is over twice that: Pillow refuses it
    with pytest.raises(DataError, match=rf"^image '{tmp_path / 'big.png'}' is 1,600 pixels, more than the 500 "
                                        r"Pillow decodes safely \(a guard against decompression bombs\); scale it "
                                        r"down first$"):
        open_image(tmp_path / "big.png")
    # Below twice the limit Pillow only warned, and decoding a 12000x12000 PNG in every reader ran out of memory.
    save_png(tmp_path / "large.png", pixels(0, 30))
    with warnings.catch_warnings(record=True) as warned:
        with pytest.raises(DataError, match=r"^image '.*large.png' is 30x30, 900 pixels, more than the 500 Pillow "):
            open_image(tmp_path / "large.png")
    assert not [w for w in warned if issubclass(w.category, PILImage.DecompressionBombWarning)]


@pytest.mark.parametrize("layout, says", [
    ("empty", "holds no PNG or JPEG images in class sub-folders"),
    ("loose images", "images lie in it directly (a.png...): put them in class sub-folders or list them"),
    ("missing file", r"metadata.jsonl:2 names 'gone.png', which is not a file inside"),
    ("no file_name", r"metadata.jsonl:1 names no file"),
    ("escaping path", r"metadata.jsonl:1 names '../outside.png', which is not a file inside"),
    ("mixed labels", "'label' must be all non-negative integers or all class names"),
    ("too many classes", "holds 11 classes (c00, c01, c02, c03, c04, ...), more than model.num_classes=10"),
    ("empty class", "class folder '{root}/b' holds no PNG or JPEG images, yet would be class 1 and number the "
                    "classes after it; add images to it or remove it"),
    ("not UTF-8", "metadata.jsonl:2 is not UTF-8 text (byte 0xe9 at column 48); save metadata.jsonl as UTF-8"),
])
def test_a_folder_that_cannot_serve_is_refused_in_one_line(tmp_path, layout, says):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "loose images":
        save_png(root / "a.png", pixels(0))
    elif layout == "too many classes":
        for c in range(11):
            save_png(root / f"c{c:02d}" / "x.png", pixels(c))
    elif layout == "empty class":  # torchvision's ImageFolder refuses it too
        for name in ("a", "c"):
            save_png(root / name / "x.png", pixels(0))
        (root / "b").mkdir()
    elif layout != "empty":
        save_png(root / "a.png", pixels(0))
        save_png(tmp_path / "outside.png", pixels(1))
        rows = {"missing file": [{"file_name": "a.png", "label": 0}, {"file_name": "gone.png", "label": 1}],
                "no file_name": [{"label": 0}],
                "escaping path": [{"file_name": "../outside.png", "label": 0}],
                "mixed labels": [{"file_name": "a.png", "label": 0}, {"file_name": "a.png", "label": "x"}],
                "not UTF-8": [{"file_name": "a.png", "label": 0}, {"file_name": "a.png", "label": 0, "text": "cafX"}],
                }[layout]
        (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
        if layout == "not UTF-8":  # a Latin-1 file: ended in "unexpected UnicodeDecodeError", naming no file
            (root / "metadata.jsonl").write_bytes((root / "metadata.jsonl").read_bytes().replace(b"X", b"\xe9"))
    with pytest.raises((DataError, ConfigError)) as err:
        open_images(config("images.source=folder", f"images.folder={root}"))
    assert says.format(root=root) in str(err.value) and "\n" not in str(err.value)


def write_split(root: pathlib.Path, labels: list[int], captioned: bool = True) -> pathlib.Path:
    """A folder of one image per label with its metadata.jsonl (each line captioned, or all but the 3rd)."""
    rows = [{"file_name": f"{i}.png", "label": label, **({"text": f"picture {i}"} if captioned or i != 2 else {})}
            for i, label in enumerate(labels)]
    for i in range(len(labels)):
        save_png(root / f"{i}.png", pixels(i))
    (root / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")
    return root / "metadata.jsonl"


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_label_outside_the_models_classes_is_named_in_either_split(tmp_path, split):
    """Held-out labels 1 and 7 with model.num_classes=5 trained and evaluated (accuracy 0.0), exit status 0."""
    labels = {"train": [0, 1, 2, 3, 4] * 2, "test": [1, 7]}
    labels[split] = [*labels[split], 9] if split == "train" else labels[split]
    written = {part: write_split(tmp_path / part, part_labels) for part, part_labels in labels.items()}
    line = {"train": 11, "test": 2}[split]
    with pytest.raises(DataError) as err:
        open_images(config("images.source=folder", f"images.folder={tmp_path}", "model.num_classes=5"))
    assert str(err.value) == (f"{written[split]}:{line} has 'label' {labels[split][line - 1]}, outside the model's "
                              f"classes 0..4; correct the label, or set model.num_classes={max(labels[split]) + 1}")


def test_text_conditioning_names_the_first_line_without_a_caption(tmp_path):
    """One caption missing of many said 'conditioning.by=text needs captions, but <dir> has none'."""
    from jaxgen.data.image_data import build_image_data

    metadata = write_split(tmp_path, [0, 1] * 5, captioned=False)
    with pytest.raises(DataError, match=rf"^conditioning.by=text needs a caption for every image, but {metadata}:3 "
                                        r"has no 'text' caption \(1 of 10 lines lack one\); give each line a caption"):
        build_image_data(config("images.source=folder", f"images.folder={tmp_path}", "model.num_classes=2"),
                         caption_tokens=lambda captions: None)  # refused before any caption is tokenized


def test_metadata_listing_an_image_twice_an_empty_caption_or_missing_images_is_warned_of(tmp_path, caplog):
    metadata = write_split(tmp_path, [0, 1] * 5)
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    rows[4]["text"] = "  "
    rows.append(dict(rows[1]))  # line 11 lists 1.png again
    save_png(tmp_path / "more" / "extra.png", pixels(99))  # in the folder, listed by no line
    save_png(tmp_path / ".thumbs" / "0.png", pixels(98))  # hidden: not an image of the data set
    metadata.write_text("\n".join(map(json.dumps, rows[:9])) + "\n")  # 9.png listed by no line either
    metadata.write_text(metadata.read_text() + json.dumps(rows[-1]) + "\n")
    from jaxgen.data import corpus

    corpus._reported.clear()
    with caplog.at_level(logging.WARNING, logger="jaxgen"):
        open_images(config("images.source=folder", f"images.folder={tmp_path}", "model.num_classes=2"))
    said = [r.getMessage() for r in caplog.records]
    assert f"{metadata}:10 lists a file an earlier line lists too (1 such lines); each listing is a separate " \
           "example, so those images train more often" in said
    assert f"{metadata}:5 has an empty 'text' caption (1 of 10 lines); those images train on an empty prompt" in said
    assert f"2 images in {tmp_path} are not listed in metadata.jsonl and are not read (e.g. '9.png')" in said
    metadata.write_text(json.dumps({"file_name": "0.png", "label": 0, "text": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match=rf"^{metadata}:1 has 'text' \['a', 'b'\]; a caption is text$"):
        open_images(config("images.source=folder", f"images.folder={tmp_path}", "model.num_classes=2"))


def test_a_resume_refuses_class_folders_removed_or_added(class_folders, tmp_path):
    """`rm -rf DIR/ant` renumbered bee and cat to the labels ant and bee had, and the resumed run went on."""
    import shutil

    from jaxgen.data.fingerprint import CLASSES, changed_files, data_files

    root = tmp_path / "imgs"
    shutil.copytree(class_folders, root)
    cfg = config("images.source=folder", f"images.folder={root}", "model.num_classes=4")
    saved = data_files(cfg)
    assert saved[CLASSES] == {"ant": 0, "bee": 1, "cat": 2}
    assert changed_files(saved, data_files(cfg)) == []
    shutil.rmtree(root / "ant")
    save_png(root / "dog" / "x.png", pixels(0))
    with pytest.raises(CheckpointError) as err:
        changed_files(saved, data_files(cfg))
    assert str(err.value) == ("images.folder holds other classes than this run was trained on (removed ant; added "
                              "dog): its labels would no longer name the classes the model learned; restore the "
                              "folder's classes, or start a new run in another --run-dir")
    before_classes_were_recorded = {key: files for key, files in saved.items() if key != CLASSES}
    assert changed_files(before_classes_were_recorded, data_files(cfg))[0] == "images.folder: ant/02.png gone"


# ----------------------------------------------------------------------------- IDX


def write_idx(path: pathlib.Path, array: np.ndarray, compress: bool = False) -> pathlib.Path:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """An IDX dataset of 8x8 images in 10 classes: 40 train (gzipped) and 12 t10k (plain) images."""
    root = tmp_path_factory.mktemp("idx")
    for prefix, count, gz in (("train", 40, True), ("t10k", 12, False)):
        images = np.stack([pixels(i)[..., 0] for i in range(count)])
        write_idx(root / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}", np.arange(count) % 10, gz)
    return root


def test_idx_files_give_their_images_and_labels(idx_dir):
    source = open_images(config("images.source=idx", f"images.idx={idx_dir}"))
    assert (source.size("train"), source.size("eval")) == (40, 12)
    record = source.parts["eval"][7]
    np.testing.assert_array_equal(record["image"], pixels(7))
    assert record["label"] == 7


@pytest.mark.parametrize("damage, says", [
    ("truncated", r"holds 100 values after its header, but its shape \(40, 8, 8\) needs 2560"),
    ("not idx", "is not an IDX file"),
    ("float values", "holds values of type 0x0d"),
    ("bad gzip", "cannot be read"),
])
def test_a_damaged_idx_file_is_named(idx_dir, tmp_path, damage, says):
    import shutil

    root = tmp_path / "idx"
    shutil.copytree(idx_dir, root)
    path = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    changed = {"truncated": raw[:16 + 100], "not idx": b"PK" + raw[2:],
               "float values": raw[:2] + b"\x0d" + raw[3:]}.get(damage)
    path.write_bytes(gzip.compress(changed) if changed is not None else path.read_bytes()[:30])
    with pytest.raises(DataError, match=says) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_idx_errors_name_the_key(idx_dir, tmp_path):
    with pytest.raises(DataError, match="has no t10k-labels-idx1-ubyte"):
        (tmp_path / "x").mkdir()
        for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte"):
            (tmp_path / "x" / name).write_bytes((idx_dir / name).read_bytes())
        open_images(config("images.source=idx", f"images.idx={tmp_path / 'x'}"))
    with pytest.raises(ConfigError, match="holds 8x8x1 images in 10 classes, but model.image_size=16"):
        open_images(config("images.source=idx", f"images.idx={idx_dir}", "model.image_size=16"))
    with pytest.raises(ConfigError, match="images.source=idx needs images.idx=DIR"):
        config("images.source=idx")
    # One damaged label among 0..9: the advice to train 43 classes is named as doubtful, with the record.
    import shutil

    shutil.copytree(idx_dir, tmp_path / "odd")
    labels = np.arange(12) % 10
    labels[5] = 42
    write_idx(tmp_path / "odd" / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(ConfigError, match=r"in 43 classes, but .* model.num_classes=43 \(but only 11 of labels "
                                          r"0..42 occur: label 42 of record 5 of the t10k labels may be damaged\)$"):
        open_images(config("images.source=idx", f"images.idx={tmp_path / 'odd'}"))
    # A config file's images.idx with another source given on the command line (it read as the user's mistake).
    with pytest.raises(ConfigError, match=rf"images.idx='{idx_dir}' is read only with images.source=idx, and "
                                          rf"images.source is 'digits'; give images.source=idx, or images.idx=null "
                                          "to read 'digits'"):
        config(f"images.idx={idx_dir}", "images.source=digits")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_as_debian_installs_it():
    source = open_images(config("images.source=idx", f"images.idx={FASHION_MNIST}", "model.image_size=28"))
    assert (source.size("train"), source.size("eval")) == (60_000, 10_000)
    labels = np.bincount([source.parts["eval"][i]["label"] for i in range(10_000)], minlength=10)
    assert labels.tolist() == [1000] * 10


def test_jaxgen_train_a_dit_on_an_image_folder(class_folders, tmp_path):
    result = jaxgen_cli("train", "--config", str(DIT_CONFIG), "--run-dir", str(tmp_path / "run"), "model.size=null",
                        "model.d_model=32", "model.n_layers=1", "model.freq_dim=32", "model.num_classes=3",
                        "images.source=folder", f"images.folder={class_folders}", "images.eval_every_nth=3",
                        "data.batch_size=8",
                        "train.steps=3", "train.eval_every=3", "train.eval_batches=1", "diffusion.samples_per_class=1",
                        "diffusion.sample_steps=2", "logging.progress_bar=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"data: {class_folders.name}, 20 train and 10 held-out images" in result.stderr
    assert (tmp_path / "run" / "samples" / "final.png").is_file()


def test_fashion_captions_name_class_shade_and_width_as_a_captioned_folder(idx_dir, tmp_path):
    from jaxgen.data.fashion_captions import CLASSES, captions, write_fashion_captions

    # Hand-checked: shade cut at the terciles, width against the class's own median.
    rows = captions(np.array([10.0, 150.0, 250.0]), np.array([0.2, 0.9, 0.5]), np.array([9, 0, 1]),
                    np.array([100.0, 200.0]), np.full(10, 0.5))
    assert [r["text"] for r in rows] == ["a dark narrow ankle boot", "a mid-grey wide t-shirt", "a light narrow trouser"]
    summary = write_fashion_captions(idx_dir, tmp_path / "captioned")
    assert (summary["train"], summary["test"]) == (40, 12)
    lines = [json.loads(line) for line in (tmp_path / "captioned" / "train" / "metadata.jsonl").read_text().splitlines()]
    assert [r["label"] for r in lines] == [i % 10 for i in range(40)]
    assert all(r["text"] == f"a {r['shade']} {r['width']} {CLASSES[r['label']]}" for r in lines)
    source = open_images(config("images.source=folder", f"images.folder={tmp_path / 'captioned'}",
                                "model.image_size=8", "model.channels=1"))
    assert source.part_captions["train"] == tuple(r["text"] for r in lines)
    assert len(source.part_captions["eval"]) == 12
    with pytest.raises(DataError, match="already exists"):
        write_fashion_captions(idx_dir, tmp_path / "captioned")


def test_fashion_captions_on_a_full_disk_leave_nothing_and_a_rerun_finishes(idx_dir, tmp_path):
    out = tmp_path / "captioned"
    full = run_jaxgen("data", "fashion-captions", "--idx", str(idx_dir), "--out", str(out), file_size_limit=1024)
    assert full.returncode == 1
    assert full.stderr.strip().splitlines()[-1] == (f"jaxgen: error: {out}: file too large "
                                                    "(a file-size limit was reached)")
    assert "Traceback" not in full.stderr
    assert os.listdir(tmp_path) == []  # neither --out nor a half-written hidden directory
    again = run_jaxgen("data", "fashion-captions", "--idx", str(idx_dir), "--out", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["train"] == 40
    assert len((out / "train" / "metadata.jsonl").read_text().splitlines()) == 40
