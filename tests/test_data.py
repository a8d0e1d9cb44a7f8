"""Image decoding, VOC / COCO / folder datasets, labels files and the decoding DataLoader, on tiny
fixtures written into tmp_path (images written with Pillow, independently of the OpenCV reader)."""

import io
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from wsss_fast.data import (COCO_CLASSES, VOC_CLASSES, COCODataset, FolderDataset,
                            ImageDecodeError, VOCDataset, build_coco_label_masks, image_loader,
                            open_dataset, read_image, read_label_png, voc_palette,
                            write_label_png)
from wsss_fast.data.labels import read_labels_file
from wsss_fast.data.loader import DecodedImages, _single_threaded_worker


def _rgb(height, width, seed=0):
    """A smooth colour image whose three channels differ (catches BGR/RGB swaps)."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    image = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)),
                      np.full_like(x, 60 + int(rng.integers(100)))], axis=-1)
    return image.astype(np.uint8)


def _save(path, array, mode=None, **options):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path, **options)
    return path


def _jpeg_bytes(image, **options):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _write(path, data: bytes):
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


# ============================================================================ decoding

def test_jpeg_decodes_as_rgb_like_pillow(tmp_path):
    image = _rgb(48, 64)
    path = _write(tmp_path / "a.jpg", _jpeg_bytes(image))
    decoded = read_image(path)
    assert decoded.dtype == np.uint8 and decoded.shape == (48, 64, 3)
    assert decoded.flags["C_CONTIGUOUS"]
    reference = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(decoded.astype(int) - reference).max() <= 3  # libjpeg builds may differ by ±1
    assert np.abs(decoded.astype(int) - image.astype(int)).mean() < 3


@pytest.mark.parametrize("kind", ["png", "bmp", "webp"])
def test_lossless_formats_decode_exactly(tmp_path, kind):
    image = _rgb(17, 23)
    options = {"lossless": True} if kind == "webp" else {}
    path = _save(tmp_path / f"a.{kind}", image, **options)
    np.testing.assert_array_equal(read_image(path), image)


def test_grayscale_gray_alpha_and_rgba_pngs(tmp_path):
    image = _rgb(9, 11)
    gray = image[:, :, 0]
    np.testing.assert_array_equal(read_image(_save(tmp_path / "g.png", gray)),
                                  np.repeat(gray[:, :, None], 3, axis=2))
    alpha = np.linspace(0, 255, gray.size).reshape(gray.shape).astype(np.uint8)
    gray_alpha = _save(tmp_path / "la.png", np.stack([gray, alpha], -1), mode=None)
    assert Image.open(gray_alpha).mode == "LA"
    np.testing.assert_array_equal(read_image(gray_alpha), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = _save(tmp_path / "rgba.png", np.concatenate([image, alpha[:, :, None]], -1))
    assert Image.open(rgba).mode == "RGBA"
    np.testing.assert_array_equal(read_image(rgba), image)  # alpha dropped, colour kept


def test_sixteen_bit_pngs_are_scaled_by_shifting(tmp_path):
    rng = np.random.default_rng(1)
    gray16 = rng.integers(0, 65536, (7, 5), dtype=np.uint16)
    path = _save(tmp_path / "g16.png", gray16)
    assert Image.open(path).mode.startswith("I;16")
    np.testing.assert_array_equal(read_image(path)[:, :, 1], (gray16 >> 8).astype(np.uint8))
    rgb16 = rng.integers(0, 65536, (6, 4, 3), dtype=np.uint16)
    ok, data = cv2.imencode(".png", rgb16[:, :, ::-1].copy())  # OpenCV writes BGR order
    assert ok
    decoded = read_image(_write(tmp_path / "c16.png", data.tobytes()))
    np.testing.assert_array_equal(decoded, (rgb16 >> 8).astype(np.uint8))


def test_palette_png_reads_as_colours(tmp_path):
    indices = np.arange(30, dtype=np.uint8).reshape(5, 6)
    image = Image.fromarray(indices)
    image.putpalette(voc_palette().tobytes())
    path = str(tmp_path / "p.png")
    image.save(path)
    np.testing.assert_array_equal(read_image(path), voc_palette()[indices])


@pytest.mark.parametrize("shape", [(1, 1), (10000, 10), (10, 10000)])
def test_extreme_sizes_decode(tmp_path, shape):
    image = _rgb(*shape)
    assert read_image(_save(tmp_path / "a.png", image)).shape == shape + (3,)
    assert read_image(_write(tmp_path / "a.jpg", _jpeg_bytes(image))).shape == shape + (3,)


def _exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 segment whose payload holds a complete JPEG (EOI included), as EXIF thumbnails do."""
    payload = b"Exif\x00\x00" + thumbnail
    return b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload


def test_truncated_jpegs_are_refused(tmp_path):
    data = _jpeg_bytes(_rgb(64, 80))
    assert data.endswith(b"\xff\xd9")
    for cut in (2, 40, len(data) // 2, len(data) - 200):
        path = _write(tmp_path / f"cut{cut}.jpg", data[:len(data) - cut])
        with pytest.raises(ImageDecodeError, match="truncated JPEG") as info:
            read_image(path)
        assert path in str(info.value)
    progressive = _jpeg_bytes(_rgb(64, 80), progressive=True)
    read_image(_write(tmp_path / "progressive.jpg", progressive))
    with pytest.raises(ImageDecodeError, match="truncated"):
        read_image(_write(tmp_path / "progressive_cut.jpg", progressive[:len(progressive) // 2]))


def test_truncation_is_found_behind_an_embedded_thumbnail(tmp_path):
    # A naive "does an EOI marker occur anywhere" check is fooled by the thumbnail's EOI.
    main = _jpeg_bytes(_rgb(64, 80))
    with_thumbnail = main[:2] + _exif_with_thumbnail(_jpeg_bytes(_rgb(8, 8))) + main[2:]
    np.testing.assert_array_equal(read_image(_write(tmp_path / "ok.jpg", with_thumbnail)),
                                  read_image(_write(tmp_path / "plain.jpg", main)))
    cut = with_thumbnail[:len(with_thumbnail) - 300]
    assert b"\xff\xd9" in cut
    with pytest.raises(ImageDecodeError, match="truncated JPEG"):
        read_image(_write(tmp_path / "cut.jpg", cut))


def test_trailing_bytes_after_the_jpeg_end_are_accepted(tmp_path):
    data = _jpeg_bytes(_rgb(16, 16))
    expected = read_image(_write(tmp_path / "a.jpg", data))
    np.testing.assert_array_equal(read_image(_write(tmp_path / "b.jpg", data + b"\0" * 64)),
                                  expected)


@pytest.mark.parametrize("kind, message", [("png", "truncated PNG"), ("bmp", "truncated BMP"),
                                           ("webp", "truncated WebP")])
def test_truncated_png_bmp_webp_are_refused(tmp_path, kind, message):
    path = _save(tmp_path / f"full.{kind}", _rgb(40, 40, seed=3))
    with open(path, "rb") as handle:
        data = handle.read()
    cut = _write(tmp_path / f"cut.{kind}", data[:len(data) * 2 // 3])
    with pytest.raises(ImageDecodeError, match=message) as info:
        read_image(cut)
    assert cut in str(info.value)


def test_bad_files_raise_errors_naming_the_path(tmp_path):
    cases = {
        "empty": (_write(tmp_path / "empty.jpg", b""), "empty file"),
        "text": (_write(tmp_path / "text.jpg", b"this is not an image\n" * 10),
                 "not a decodable image"),
        "missing": (str(tmp_path / "missing.jpg"), "no such file"),
        "directory": (str(tmp_path), "is a directory"),
        "garbage jpeg": (_write(tmp_path / "garbage.jpg", b"\xff\xd8" + b"\x17" * 500 +
                                b"\xff\xd9"), "not a decodable image"),
    }
    for path, message in cases.values():
        with pytest.raises(ImageDecodeError, match=message) as info:
            read_image(path)
        assert path in str(info.value)
        assert isinstance(info.value, ValueError)


def test_label_png_gives_palette_indices_not_colours(tmp_path):
    label = np.array([[0, 1, 2], [15, 255, 20]], dtype=np.uint8)
    path = str(tmp_path / "p.png")
    image = Image.fromarray(label)
    image.putpalette(voc_palette().tobytes())
    image.save(path)
    np.testing.assert_array_equal(read_label_png(path), label)
    np.testing.assert_array_equal(read_label_png(_save(tmp_path / "l.png", label)), label)
    with pytest.raises(ImageDecodeError, match="single-channel"):
        read_label_png(_save(tmp_path / "rgb.png", _rgb(4, 4)))
    with open(path, "rb") as handle:
        data = handle.read()
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        read_label_png(_write(tmp_path / "cut.png", data[:-20]))


def test_write_label_png_palette_and_plain(tmp_path):
    label = np.random.default_rng(2).integers(0, 21, (13, 17)).astype(np.uint8)
    label[0, :5] = 255
    write_label_png(tmp_path / "out" / "p.png", label)
    with Image.open(tmp_path / "out" / "p.png") as image:
        assert image.mode == "P"
        palette = np.frombuffer(bytes(image.getpalette()), np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette, voc_palette()[:len(palette)])
        np.testing.assert_array_equal(np.array(image), label)
    write_label_png(tmp_path / "out" / "l.png", label.astype(np.int64), palette=False)
    with Image.open(tmp_path / "out" / "l.png") as image:
        assert image.mode == "L"
        np.testing.assert_array_equal(np.array(image), label)
    write_label_png(tmp_path / "out" / "p.png", np.zeros((2, 3), np.uint8))  # replaces
    assert read_label_png(tmp_path / "out" / "p.png").shape == (2, 3)
    assert sorted(os.listdir(tmp_path / "out")) == ["l.png", "p.png"]  # no temp files left


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 1), np.uint8), "2-D"), (np.zeros((2, 3), np.float32), "integer dtype"),
    (np.full((2, 3), 256, np.int32), "0..255"), (np.full((2, 3), -1, np.int16), "0..255")])
def test_write_label_png_rejects_bad_labels(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        write_label_png(tmp_path / "x.png", bad)
    assert not os.listdir(tmp_path)


# ============================================================================ VOC

def _palette_png(path, label):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    image = Image.fromarray(label.astype(np.uint8))
    image.putpalette(voc_palette().tobytes())
    image.save(str(path))


def _gt(values, shape=(12, 16)):
    """A label map holding the given values in horizontal bands, with a 255 border."""
    label = np.zeros(shape, np.uint8)
    for i, value in enumerate(values):
        label[2 + 3 * i:4 + 3 * i, 2:10] = value
    label[0, :] = 255
    return label


VOC_IDS = ["2007_000001", "2007_000002", "2007_000003", "2007_000004"]
VOC_LABELS = {"2007_000001": [0, 14], "2007_000002": [4], "2007_000003": [11, 14, 19]}


def _make_voc(root, key_style="int"):
    for i, id in enumerate(VOC_IDS):
        _save(root / "JPEGImages" / f"{id}.jpg", _rgb(12, 16, seed=i))
    _palette_png(root / "SegmentationClass" / "2007_000001.png", _gt([1, 15]))
    _palette_png(root / "SegmentationClass" / "2007_000002.png", _gt([5]))
    _save(root / "SegmentationClassAug" / "2007_000002.png", _gt([7]))  # shadowed
    _save(root / "SegmentationClassAug" / "2007_000003.png", _gt([12, 15, 20]))
    split_dir = root / "ImageSets" / "Segmentation"
    split_dir.mkdir(parents=True)
    (split_dir / "train.txt").write_text("2007_000001\n2007_000002\n2007_000003\n2007_000009\n")
    (root / "train_psa.txt").write_text(
        "".join(f"/JPEGImages/{id}.jpg /SegmentationClassAug/{id}.png\n"
                for id in ("2007_000003", "2007_000001", "2007_000003")))
    entries = {}
    for id, classes in VOC_LABELS.items():
        vector = np.zeros(20, np.float32)
        vector[classes] = 1
        entries[int(id.replace("_", "")) if key_style == "int" else id] = vector
    np.save(root / "cls_labels.npy", entries, allow_pickle=True)
    return root


def _expected(classes, k=20):
    vector = np.zeros(k, np.float32)
    vector[classes] = 1
    return vector


@pytest.mark.parametrize("key_style", ["int", "str"])
def test_voc_split_labels_and_gt(tmp_path, key_style):
    root = _make_voc(tmp_path / "VOC2012", key_style)
    dataset = VOCDataset(root, split="train")
    assert dataset.ids == VOC_IDS[:3] and len(dataset) == 3
    assert dataset.class_names == VOC_CLASSES
    for id, classes in VOC_LABELS.items():
        sample = dataset.sample(id)
        np.testing.assert_array_equal(sample.labels, _expected(classes))
        assert sample.labels.dtype == np.float32 and not sample.labels.flags.writeable
        assert sample.image_path == str(root / "JPEGImages" / f"{id}.jpg")
    assert dataset.sample("2007_000002").gt_path.endswith(
        os.path.join("SegmentationClass", "2007_000002.png"))  # preferred over Aug
    assert dataset.sample("2007_000003").gt_path.endswith(
        os.path.join("SegmentationClassAug", "2007_000003.png"))
    assert [p[0] for p in dataset.problems()] == ["2007_000009"]
    assert "no image" in dataset.problems()[0][1]
    with pytest.raises(KeyError, match="2007_000004"):
        dataset.sample("2007_000004")


def test_voc_psa_list_devkit_root_and_all_images(tmp_path):
    root = _make_voc(tmp_path / "VOCdevkit" / "VOC2012")
    dataset = open_dataset("auto", tmp_path / "VOCdevkit", split="train_psa")
    assert isinstance(dataset, VOCDataset) and dataset.ids == ["2007_000001", "2007_000003"]
    assert any("listed again" in message for _, message in dataset.problems())
    by_path = VOCDataset(root, split=str(root / "train_psa.txt"))
    assert by_path.ids == dataset.ids
    everything = VOCDataset(root)
    assert everything.ids == VOC_IDS
    assert everything.sample("2007_000004").labels is None  # absent from cls_labels.npy
    assert ("2007_000004", ) == tuple(p[0] for p in everything.problems())
    with pytest.raises(ValueError, match="not found; looked for"):
        VOCDataset(root, split="nosuchsplit")
    with pytest.raises(ValueError, match="not a VOC2012 folder"):
        VOCDataset(tmp_path)


def test_voc_labels_from_gt_without_labels_file(tmp_path):
    root = _make_voc(tmp_path / "VOC2012")
    os.unlink(root / "cls_labels.npy")
    dataset = VOCDataset(root)
    np.testing.assert_array_equal(dataset.sample("2007_000001").labels, _expected([0, 14]))
    np.testing.assert_array_equal(dataset.sample("2007_000002").labels, _expected([4]))
    np.testing.assert_array_equal(dataset.sample("2007_000003").labels, _expected([11, 14, 19]))
    assert dataset.sample("2007_000004").labels is None and dataset.sample("2007_000004").gt_path \
        is None
    assert not dataset.sample("2007_000001").labels.flags.writeable
    _palette_png(root / "SegmentationClass" / "2007_000004.png", _gt([21]))
    with pytest.raises(ValueError, match="exceeds the 20"):
        VOCDataset(root).sample("2007_000004")


def test_voc_classes_txt_and_csv_labels(tmp_path):
    root = _make_voc(tmp_path / "VOC2012")
    (root / "classes.txt").write_text("a\nb\nc\n")
    os.unlink(root / "cls_labels.npy")
    (root / "labels.csv").write_text("2007_000001,a c\n2007_000002,1\n2007_000003,\n")
    dataset = VOCDataset(root, split="train", labels=root / "labels.csv")
    assert dataset.class_names == ("a", "b", "c")
    np.testing.assert_array_equal(dataset.sample("2007_000001").labels, [1, 0, 1])
    np.testing.assert_array_equal(dataset.sample("2007_000002").labels, [0, 1, 0])
    np.testing.assert_array_equal(dataset.sample("2007_000003").labels, [0, 0, 0])
    np.save(root / "cls_labels.npy", {2007000001: np.ones(20)}, allow_pickle=True)
    with pytest.raises(ValueError, match="expected 3 class entries"):
        VOCDataset(root)


def test_open_dataset_kinds(tmp_path):
    _save(tmp_path / "plain" / "x.png", _rgb(4, 4))
    assert isinstance(open_dataset("auto", tmp_path / "plain"), FolderDataset)
    with pytest.raises(ValueError, match="unknown dataset kind"):
        open_dataset("imagenet", tmp_path / "plain")
    with pytest.raises(ValueError, match="not a directory"):
        open_dataset("auto", tmp_path / "nowhere")


# ============================================================================ COCO

def _uncompressed_rle(mask):
    """COCO's uncompressed RLE, written here independently: column-major runs starting with 0s."""
    flat = mask.flatten(order="F").astype(np.int64)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _polygon_mask(polygons, height, width, factor=8):
    """Fraction of each pixel inside the polygons (cv2.fillPoly at 8x8 sub-pixels)."""
    canvas = np.zeros((height * factor, width * factor), np.uint8)
    for polygon in polygons:
        points = (np.asarray(polygon, np.float64).reshape(-1, 2) * factor - 0.5) * 16
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1, shift=4)
    return canvas.reshape(height, factor, width, factor).mean(axis=(1, 3))


# pycocotools' own decode trips a NumPy 2 deprecation warning; not ours to fix.
coco_warning = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
PERSON, STOP_SIGN, DOG, TOOTHBRUSH = 1, 13, 18, 90  # COCO category ids
# Contiguous indices (ids 12, 26, 29, ... do not exist): 0, 11, 16, 79; PNG value = index + 1.
INDEX = {PERSON: 0, STOP_SIGN: 11, DOG: 16, TOOTHBRUSH: 79}


def _make_coco(root, split="val2014"):
    h1, w1, h2, w2 = 40, 50, 30, 36
    person = [[5.0, 5.0, 30.0, 6.0, 28.0, 30.0, 6.0, 28.0]]
    dog = [[20.0, 15.0, 45.0, 15.0, 45.0, 35.0, 20.0, 35.0], [1.0, 33.0, 8.0, 33.0, 4.0, 39.0]]
    crowd = np.zeros((h1, w1), np.uint8)
    crowd[0:12, 35:50] = 1
    stop = np.zeros((h2, w2), np.uint8)
    stop[3:20, 4:15] = 1
    stop[25, 30] = 1
    later_person = np.zeros((h2, w2), np.uint8)
    later_person[10:28, 10:30] = 1
    compressed = coco_mask.encode(np.asfortranarray(stop))
    compressed["counts"] = compressed["counts"].decode("ascii")
    images = [
        {"id": 9, "file_name": f"COCO_{split}_000000000009.jpg", "height": h1, "width": w1},
        {"id": 25, "file_name": f"COCO_{split}_000000000025.jpg", "height": h2, "width": w2},
        {"id": 30, "file_name": f"COCO_{split}_000000000030.jpg", "height": 20, "width": 20},
        {"id": 31, "file_name": f"COCO_{split}_000000000031.jpg", "height": 20, "width": 20},
    ]
    annotations = [
        {"id": 1, "image_id": 9, "category_id": PERSON, "segmentation": person, "iscrowd": 0},
        {"id": 2, "image_id": 9, "category_id": DOG, "segmentation": dog, "iscrowd": 0},
        {"id": 3, "image_id": 9, "category_id": TOOTHBRUSH, "segmentation":
            _uncompressed_rle(crowd), "iscrowd": 1},
        {"id": 4, "image_id": 25, "category_id": STOP_SIGN, "segmentation": compressed,
         "iscrowd": 0},
        {"id": 5, "image_id": 25, "category_id": PERSON,
         "segmentation": _uncompressed_rle(later_person), "iscrowd": 0},
    ]
    names = dict(zip((1, 13, 18, 90), ("person", "stop sign", "dog", "toothbrush")))
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for i, n in names.items()]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    for image in images[:3]:  # image 31's file is missing
        _save(root / split / image["file_name"], _rgb(image["height"], image["width"]))
    return {"person": person, "dog": dog, "crowd": crowd, "stop": stop,
            "later_person": later_person}


def test_coco_image_labels_include_crowd_and_follow_category_order(tmp_path):
    _make_coco(tmp_path)
    dataset = open_dataset("auto", tmp_path, split="val")
    assert isinstance(dataset, COCODataset) and dataset.class_names == COCO_CLASSES
    assert dataset.ids == sorted(f"COCO_val2014_{n:012d}" for n in (9, 25, 30))
    assert [COCO_CLASSES[i] for i in INDEX.values()] == ["person", "stop sign", "dog",
                                                         "toothbrush"]
    expected = {9: [0, 16, 79], 25: [0, 11], 30: []}
    for number, classes in expected.items():
        sample = dataset.sample(f"COCO_val2014_{number:012d}")
        np.testing.assert_array_equal(sample.labels, _expected(classes, 80))
        assert sample.gt_path is None
    assert [p[0] for p in dataset.problems()] == ["COCO_val2014_000000000031"]
    assert COCODataset(tmp_path).ids == dataset.ids  # the only split present
    (tmp_path / "labels.csv").write_text("COCO_val2014_000000000009,dog;stop sign\n")
    from_file = COCODataset(tmp_path, split="val2014", labels=tmp_path / "labels.csv")
    np.testing.assert_array_equal(from_file.sample("COCO_val2014_000000000009").labels,
                                  _expected([11, 16], 80))
    assert from_file.sample("COCO_val2014_000000000025").labels is None
    with pytest.raises(ValueError, match="available splits"):
        COCODataset(tmp_path, split="train2014")


@coco_warning
def test_coco_label_masks_match_an_independent_rasterization(tmp_path):
    shapes = _make_coco(tmp_path)
    out = build_coco_label_masks(tmp_path, "val2014", workers=0)
    assert out == str(tmp_path / "mask" / "val2014")
    assert sorted(os.listdir(out)) == [f"COCO_val2014_{n:012d}.png" for n in (9, 25, 30, 31)]

    first = read_label_png(os.path.join(out, "COCO_val2014_000000000009.png"))
    person = _polygon_mask(shapes["person"], 40, 50)
    dog = _polygon_mask(shapes["dog"], 40, 50)
    certain = ((person == 0) | (person == 1)) & ((dog == 0) | (dog == 1))
    expected = np.zeros((40, 50), np.uint8)
    expected[person == 1] = INDEX[PERSON] + 1
    expected[dog == 1] = INDEX[DOG] + 1  # later annotation wins
    assert certain.mean() > 0.8
    np.testing.assert_array_equal(first[certain], expected[certain])
    assert ((person == 1) & (dog == 1)).any()  # the overlap is tested
    assert set(np.unique(first)) == {0, 1, 17}  # the crowd toothbrush stays background
    crowd_only = (shapes["crowd"] == 1) & (person == 0) & (dog == 0)
    assert crowd_only.sum() > 50 and not first[crowd_only].any()

    second = read_label_png(os.path.join(out, "COCO_val2014_000000000025.png"))
    expected = np.zeros((30, 36), np.uint8)
    expected[shapes["stop"] == 1] = INDEX[STOP_SIGN] + 1
    expected[shapes["later_person"] == 1] = INDEX[PERSON] + 1
    np.testing.assert_array_equal(second, expected)  # RLE: exact
    empty = read_label_png(os.path.join(out, "COCO_val2014_000000000030.png"))
    assert empty.shape == (20, 20) and not empty.any()

    dataset = COCODataset(tmp_path, split="val2014")
    assert dataset.sample("COCO_val2014_000000000009").gt_path == os.path.join(
        out, "COCO_val2014_000000000009.png")


@coco_warning
def test_coco_masks_resume_and_parallel_bytes(tmp_path):
    _make_coco(tmp_path)
    out = build_coco_label_masks(tmp_path, "val", workers=0)
    parallel = build_coco_label_masks(tmp_path, "val", out_dir=tmp_path / "parallel", workers=2)
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(parallel, name),
                                                            "rb") as b:
            assert a.read() == b.read()
    kept = os.path.join(out, "COCO_val2014_000000000025.png")
    broken = os.path.join(out, "COCO_val2014_000000000009.png")
    kept_inode = os.stat(kept).st_ino
    with open(broken, "r+b") as handle:
        handle.truncate(30)
    build_coco_label_masks(tmp_path, "val", workers=0)
    assert os.stat(kept).st_ino == kept_inode  # valid file left alone
    assert read_label_png(broken).shape == (40, 50)  # broken file rewritten


@coco_warning
def test_coco_custom_categories_and_bad_category(tmp_path):
    (tmp_path / "annotations").mkdir()
    _save(tmp_path / "train" / "a.jpg", _rgb(8, 8))
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 8, "width": 8}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
                             "segmentation": [[0, 0, 4, 0, 4, 4]]}],
            "categories": [{"id": 7, "name": "widget"}, {"id": 3, "name": "gadget"}]}
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    dataset = COCODataset(tmp_path, split="train")
    assert dataset.class_names == ("gadget", "widget")
    np.testing.assert_array_equal(dataset.sample("a").labels, [0, 1])
    data["annotations"][0]["category_id"] = 5
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown category id 5"):
        COCODataset(tmp_path, split="train")


# ============================================================================ folder

def _make_folder(root):
    _save(root / "b.jpg", _rgb(8, 8))
    _save(root / "a.PNG", _rgb(8, 9))
    _save(root / "sub" / "c.JPEG", _rgb(9, 8))
    _save(root / "sub" / "deep" / "d.bmp", _rgb(5, 5))
    _save(root / "sub" / "e.webp", _rgb(6, 6), lossless=True)
    _save(root / ".hidden" / "x.jpg", _rgb(4, 4))
    _save(root / "sub" / "c.png", _rgb(4, 4))  # same id as sub/c.JPEG
    (root / "notes.txt").write_text("not an image")
    return root


FOLDER_IDS = ["a", "b", "sub/c", "sub/deep/d", "sub/e"]


def test_folder_indexing(tmp_path):
    dataset = FolderDataset(_make_folder(tmp_path / "images"))
    assert dataset.ids == FOLDER_IDS
    assert dataset.class_names == VOC_CLASSES
    assert dataset.sample("sub/c").image_path.endswith("c.JPEG")
    assert dataset.sample("a").labels is None and dataset.sample("a").gt_path is None
    problems = dataset.problems()
    assert len(problems) == 1 and problems[0][0].endswith("c.png") and "same id" in problems[0][1]
    (tmp_path / "list.txt").write_text("sub/c\n./b.jpg\nnope\n")
    restricted = FolderDataset(tmp_path / "images", split=tmp_path / "list.txt")
    assert restricted.ids == ["b", "sub/c"]
    assert ("nope", ) in {p[:1] for p in restricted.problems()}


def test_folder_csv_labels_names_indices_and_problems(tmp_path):
    root = _make_folder(tmp_path / "images")
    (tmp_path / "labels.csv").write_text(
        "id,labels\n"
        "a,cat dog\n"
        "b,0;14\n"
        "sub/c.JPEG,person\n"
        "sub/deep/d,\n"
        "ghost,cat\n")
    dataset = FolderDataset(root, labels=tmp_path / "labels.csv")
    assert dataset.class_names == VOC_CLASSES  # every name used is a VOC class
    np.testing.assert_array_equal(dataset.sample("a").labels, _expected([7, 11]))
    np.testing.assert_array_equal(dataset.sample("b").labels, _expected([0, 14]))
    np.testing.assert_array_equal(dataset.sample("sub/c").labels, _expected([14]))
    np.testing.assert_array_equal(dataset.sample("sub/deep/d").labels, _expected([]))
    assert dataset.sample("sub/e").labels is None
    reported = {item for item, _ in dataset.problems()}
    assert {"ghost", "sub/e"} <= reported
    (tmp_path / "typo.csv").write_text("a,cat\nb,persn\n")
    with pytest.raises(ValueError, match=r"typo.csv:2: unknown class name 'persn'"):
        FolderDataset(root, labels=tmp_path / "typo.csv")
    (tmp_path / "bad.csv").write_text("a,cat\nb,unicorn\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: unknown class name 'unicorn'"):
        FolderDataset(root, labels=tmp_path / "bad.csv", classes=["cat", "dog"])
    (tmp_path / "range.csv").write_text("a,20\n")
    with pytest.raises(ValueError, match="index 20 out of range"):
        FolderDataset(root, labels=tmp_path / "range.csv")


def test_folder_csv_header_columns_and_custom_names(tmp_path):
    root = _make_folder(tmp_path / "images")
    (tmp_path / "wide.csv").write_text("id,zebra,apple\na,1,0\nb,1,1\n")
    dataset = FolderDataset(root, labels=tmp_path / "wide.csv")
    assert dataset.class_names == ("zebra", "apple")
    np.testing.assert_array_equal(dataset.sample("a").labels, [1, 0])
    reordered = FolderDataset(root, labels=tmp_path / "wide.csv", classes=["apple", "zebra"])
    np.testing.assert_array_equal(reordered.sample("a").labels, [0, 1])
    (tmp_path / "names.csv").write_text("a,zebra\nb,apple zebra\n")
    with pytest.raises(ValueError, match=r"names.csv:1: unknown class name 'zebra' and 1 more "
                       r"\('apple'\) \(known: aeroplane, .*, tvmonitor; these are the VOC"):
        FolderDataset(root, labels=tmp_path / "names.csv")   # other classes need their names
    (tmp_path / "classes.txt").write_text("zebra\napple\nkiwi\n")
    with_file = FolderDataset(root, labels=tmp_path / "names.csv",
                              classes=tmp_path / "classes.txt")
    assert with_file.class_names == ("zebra", "apple", "kiwi")
    np.testing.assert_array_equal(with_file.sample("b").labels, [1, 1, 0])
    (tmp_path / "short.csv").write_text("id,zebra,apple\na,1\n")
    with pytest.raises(ValueError, match="short.csv:2: expected 3 columns"):
        FolderDataset(root, labels=tmp_path / "short.csv")


def test_folder_json_labels(tmp_path):
    root = _make_folder(tmp_path / "images")
    (tmp_path / "names.json").write_text(json.dumps({"a.PNG": ["cat", 3], "b": []}))
    dataset = FolderDataset(root, labels=tmp_path / "names.json")
    np.testing.assert_array_equal(dataset.sample("a").labels, _expected([3, 7]))
    np.testing.assert_array_equal(dataset.sample("b").labels, _expected([]))
    (tmp_path / "hot.json").write_text(json.dumps({"a": [0, 1, 1], "b": [1, 0, 0]}))
    hot = FolderDataset(root, labels=tmp_path / "hot.json", classes=["x", "y", "z"])
    np.testing.assert_array_equal(hot.sample("a").labels, [0, 1, 1])
    (tmp_path / "mixed.json").write_text(json.dumps({"a": [0, 2], "b": [1, 0, 0]}))
    mixed = FolderDataset(root, labels=tmp_path / "mixed.json", classes=["x", "y", "z"])
    np.testing.assert_array_equal(mixed.sample("a").labels, [1, 0, 1])  # indices, not 0/1
    (tmp_path / "bad.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match="expected an object"):
        FolderDataset(root, labels=tmp_path / "bad.json")


def test_labels_file_npy_keys_and_errors(tmp_path):
    np.save(tmp_path / "l.npy", {2008000101: np.eye(20)[3], "2008_000102": np.eye(20)[0]},
            allow_pickle=True)
    names, entries = read_labels_file(tmp_path / "l.npy")
    assert names == VOC_CLASSES and set(entries) == {2008000101, "2008_000102"}
    np.save(tmp_path / "plain.npy", np.zeros((3, 20)))
    with pytest.raises(ValueError, match="pickled dict"):
        read_labels_file(tmp_path / "plain.npy")
    np.save(tmp_path / "k5.npy", {"a": np.ones(5)}, allow_pickle=True)
    with pytest.raises(ValueError, match="give the class names"):
        read_labels_file(tmp_path / "k5.npy")
    (tmp_path / "l.yaml").write_text("a: [cat]\n")
    with pytest.raises(ValueError, match="unsupported format"):
        read_labels_file(tmp_path / "l.yaml")


def test_folder_npy_labels_with_both_key_styles(tmp_path):
    root = tmp_path / "images"
    for id in ("2008_000101", "2008_000102", "2008_000103"):
        _save(root / f"{id}.jpg", _rgb(6, 6))
    np.save(tmp_path / "l.npy", {2008000101: np.eye(20)[3], "2008_000102": np.eye(20)[0]},
            allow_pickle=True)
    dataset = FolderDataset(root, labels=tmp_path / "l.npy")
    np.testing.assert_array_equal(dataset.sample("2008_000101").labels, np.eye(20)[3])
    np.testing.assert_array_equal(dataset.sample("2008_000102").labels, np.eye(20)[0])
    assert dataset.sample("2008_000103").labels is None
    assert [p[0] for p in dataset.problems()] == ["2008_000103"]


# ============================================================================ loader

def _loader_fixture(tmp_path):
    root = tmp_path / "images"
    for i in range(6):
        _save(root / f"img{i}.png", _rgb(10 + i, 12, seed=i))
    _write(root / "img3.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 10)  # corrupt, in the middle
    (tmp_path / "labels.csv").write_text("".join(f"img{i},{i}\n" for i in range(6)))
    return FolderDataset(root, labels=tmp_path / "labels.csv")


@pytest.mark.parametrize("workers", [0, 2])
def test_image_loader_in_order_with_errors(tmp_path, workers):
    dataset = _loader_fixture(tmp_path)
    ids = ["img5", "img0", "img3", "img1"]
    items = list(image_loader(dataset, ids, workers=workers, prefetch=1))
    assert [item["id"] for item in items] == ids
    for item in items:
        index = int(item["id"][3:])
        np.testing.assert_array_equal(item["labels"], _expected([index]))
        if item["id"] == "img3":
            assert item["image"] is None and "img3.png" in item["error"]
            assert "truncated PNG" in item["error"]
        else:
            assert item["error"] is None and isinstance(item["image"], np.ndarray)
            np.testing.assert_array_equal(item["image"], _rgb(10 + index, 12, seed=index))


def test_decoded_images_rejects_unknown_ids_and_worker_init(tmp_path):
    dataset = _loader_fixture(tmp_path)
    with pytest.raises(ValueError, match="not in the folder dataset"):
        DecodedImages(dataset, ["img0", "nope"])
    threads = cv2.getNumThreads()
    try:
        _single_threaded_worker(0)
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(threads)
