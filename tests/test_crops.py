"""crops: a tiny ONNX detector with imgutils' YOLO signature, whose boxes are known, and real onnxruntime."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lorakit.plugin_sdk import Item, LorakitError, ModelNotFound, ParamError, StepContext  # noqa: E402
from lorakit.plugin_sdk.testing import run_step  # noqa: E402
from lorakit.plugins.crops import (  # noqa: E402
    CropsStep, YoloDetector, fit_ratio, non_max_suppression, removed_by_crop,
)


def build_detector(path: Path, candidates, labels=("face",), imgsz=(640, 640), red_gain=12.0, fixed=None) -> Path:
    """A YOLOv8-export-shaped detector: input ``images`` (1, 3, H, W) in 0..1, output ``output0``
    (1, 4 + classes, n). Candidate boxes are fractions (cx, cy, w, h) of the input size; each
    candidate's score is sigmoid(red_gain x mean red + bias), so red pictures light up and blue ones
    do not. ``candidates`` = [(cx, cy, w, h, [bias per class])]."""
    from onnx import TensorProto, helper, numpy_helper

    n, nc = len(candidates), len(labels)
    norm = np.array([c[:4] for c in candidates], dtype=np.float32).T[None]            # (1, 4, n)
    bias = np.array([c[4] for c in candidates], dtype=np.float32).T[None]             # (1, nc, n)
    gain = np.full((1, nc, n), red_gain, dtype=np.float32)
    height, width = (fixed[1], fixed[0]) if fixed else ("height", "width")
    nodes = [
        helper.make_node("Shape", ["images"], ["shape"]),
        helper.make_node("Gather", ["shape", "wh_index"], ["wh"], axis=0),
        helper.make_node("Cast", ["wh"], ["whf"], to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["whf", "col"], ["scale"]),
        helper.make_node("Mul", ["norm", "scale"], ["boxes"]),
        helper.make_node("ReduceMean", ["images", "hw_axes"], ["means"], keepdims=0),      # (1, 3)
        helper.make_node("Gather", ["means", "zero"], ["red"], axis=1),                    # (1, 1)
        helper.make_node("Reshape", ["red", "one3"], ["red3"]),
        helper.make_node("Mul", ["red3", "gain"], ["raw"]),
        helper.make_node("Add", ["raw", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["scores"]),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_yolo",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, height, width])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 4 + nc, n])],
        initializer=[
            numpy_helper.from_array(np.array([3, 2, 3, 2], dtype=np.int64), "wh_index"),
            numpy_helper.from_array(np.array([1, 4, 1], dtype=np.int64), "col"),
            numpy_helper.from_array(norm, "norm"),
            numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "hw_axes"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
            numpy_helper.from_array(np.array([1, 1, 1], dtype=np.int64), "one3"),
            numpy_helper.from_array(gain, "gain"),
            numpy_helper.from_array(bias, "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": repr(dict(enumerate(labels))), "imgsz": repr(list(imgsz))})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


FACE = (0.5, 0.25, 0.2, 0.125)  # a face in the upper middle
BODY = (0.5, 0.6, 0.5, 0.7)


def detector(path, **kw):
    return YoloDetector(build_detector(path, **kw), ["CPUExecutionProvider"], None)


def red_picture(size=(1024, 1536), colour=(230, 40, 40)) -> Image.Image:
    return Image.new("RGB", size, colour)


# ----- the detector signature -------------------------------------------------------------------
def test_boxes_come_back_in_picture_pixels(tmp_path):
    det = detector(tmp_path / "face.onnx", candidates=[(*FACE, [-6.0])])
    assert det.input_size(1024, 1536) == (448, 640)  # imgutils: longer side to 640, sides to multiples of 32
    found = det.detect(red_picture(), 0.3, 0.5)
    assert len(found) == 1
    d = found[0]
    assert d.label == "face"
    assert d.box == (410, 288, 614, 480)  # (cx - w/2, cy - h/2, cx + w/2, cy + h/2) x (1024, 1536)
    red = (230 / 255) * 12.0 - 6.0
    assert d.score == pytest.approx(1 / (1 + np.exp(-red)), abs=1e-3)


def test_nothing_is_found_below_the_confidence_threshold(tmp_path):
    det = detector(tmp_path / "face.onnx", candidates=[(*FACE, [-6.0])])
    assert det.detect(red_picture(colour=(20, 40, 230)), 0.3, 0.5) == []


def test_overlapping_candidates_are_merged_and_the_best_kept(tmp_path):
    cands = [(0.5, 0.25, 0.2, 0.125, [-7.0]), (0.51, 0.26, 0.2, 0.125, [-6.0]), (0.2, 0.8, 0.1, 0.1, [-6.5])]
    found = detector(tmp_path / "d.onnx", candidates=cands).detect(red_picture(), 0.3, 0.5)
    assert len(found) == 2
    assert found[0].box == (420, 303, 625, 495) and found[0].score > found[1].score
    assert found[1].box == (154, 1152, 256, 1306)


def test_several_classes_take_the_label_of_their_best_score(tmp_path):
    cands = [(*FACE, [-9.0, -6.0])]
    found = detector(tmp_path / "d.onnx", candidates=cands, labels=("head", "face")).detect(red_picture(), 0.3, 0.5)
    assert [d.label for d in found] == ["face"]


def test_a_fixed_input_size_is_used_as_is(tmp_path):
    det = detector(tmp_path / "d.onnx", candidates=[(*FACE, [-6.0])], fixed=(320, 320))
    assert det.input_size(1024, 1536) == (320, 320)
    assert det.detect(red_picture(), 0.3, 0.5)[0].box == (410, 288, 614, 480)


def test_a_model_without_the_detector_signature_is_refused(tmp_path):
    from test_wd14 import build_tagger

    folder = build_tagger(tmp_path / "tagger", size=32)
    with pytest.raises(LorakitError, match="expected \\[1, 3, height, width\\]"):
        YoloDetector(folder / "model.onnx", ["CPUExecutionProvider"], None)


def test_non_max_suppression_matches_the_reference_order():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=float)
    assert non_max_suppression(boxes, np.array([0.9, 0.8, 0.7]), 0.5) == [0, 2]
    assert non_max_suppression(boxes, np.array([0.7, 0.8, 0.9]), 0.5) == [2, 1]


# ----- boxes ------------------------------------------------------------------------------------
def test_fit_ratio_grows_the_short_side_around_the_centre_and_stays_inside():
    assert fit_ratio((400, 400, 500, 600), 1.0, (1000, 1000)) == (350, 400, 550, 600)
    assert fit_ratio((0, 0, 100, 400), 0.75, (1000, 1000)) == (0, 0, 300, 400)  # shifted in at the left edge
    box = fit_ratio((100, 0, 300, 1000), 1.0, (400, 1000))  # too narrow a picture: height shrinks
    assert box == (0, 300, 400, 700)


def test_tags_a_crop_no_longer_shows():
    assert removed_by_crop("boots", "halfbody") and removed_by_crop("black_footwear", "halfbody")
    assert removed_by_crop("full_body", "halfbody") and not removed_by_crop("smile", "halfbody")
    assert not removed_by_crop("pleated_skirt", "halfbody") and removed_by_crop("pleated_skirt", "face")
    assert removed_by_crop("thighhighs", "head") and not removed_by_crop("blue_eyes", "face")
    assert not removed_by_crop("boots", "person")


# ----- the step ---------------------------------------------------------------------------------
@pytest.fixture
def models(tmp_path):
    return {
        "face": build_detector(tmp_path / "m" / "face.onnx", [(*FACE, [-6.0])]),
        "halfbody": build_detector(tmp_path / "m" / "half" / "model.onnx", [(0.5, 0.35, 0.6, 0.5, [-6.0])],
                                   labels=("halfbody",)),
        "person": build_detector(tmp_path / "m" / "person.onnx", [(*BODY, [-6.0])], labels=("person",)),
    }


def ctx(tmp_path, resolution=128):
    return StepContext("crops", tmp_path / "w", tmp_path / "t", tmp_path / "out", resolution=resolution, device="cpu")


def caption_item(tmp_path, size=(1024, 1536), mask=True) -> Item:
    path = tmp_path / "src" / "girl.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    red_picture(size).save(path)
    mask_path = None
    if mask:
        mask_path = tmp_path / "src" / "girl_mask.png"
        m = np.zeros((size[1], size[0]), dtype=np.uint8)
        m[size[1] // 4:, :] = 255
        Image.fromarray(m, "L").save(mask_path)
    tags = {"1girl": None, "solo": None, "full_body": 0.9, "boots": 0.8, "pleated_skirt": 0.7, "thighhighs": 0.6,
            "blue_eyes": 0.9, "smile": 0.5}
    return Item("girl", path, tags=tags, mask=mask_path, meta={"rating": "general"})


def test_each_detector_adds_one_crop_with_the_caption_minus_what_it_no_longer_shows(tmp_path, models):
    step = CropsStep.configure({"face_model": str(models["face"]), "halfbody_model": str(models["halfbody"].parent),
                                "padding": 0})
    c = ctx(tmp_path)
    step.setup(c)
    out = step.process(caption_item(tmp_path), c)
    original, *crops = out
    assert original.name == "girl" and original.pending_image is None
    by_name = {i.name: i for i in crops}
    assert sorted(by_name) == ["girl_face", "girl_upper"]
    face = by_name["girl_face"]
    assert face.pending_image.size == (614 - 410, 480 - 288)
    assert list(face.tags) == ["1girl", "solo", "blue_eyes", "smile", "close-up"]
    assert face.meta["crop"]["box"] == [410, 288, 614, 480] and face.meta["crop"]["parent"] == "girl"
    assert face.meta["crop"]["removed_tags"] == ["full_body", "boots", "pleated_skirt", "thighhighs"]
    assert face.meta["rating"] == "general"
    upper = by_name["girl_upper"]
    assert "pleated_skirt" in upper.tags and "boots" not in upper.tags and "upper_body" in upper.tags
    assert upper.tags["pleated_skirt"] == 0.7  # scores carry over
    # the mask is cut with the picture
    np.testing.assert_array_equal(np.asarray(face.pending_mask),
                                  np.asarray(Image.open(tmp_path / "src" / "girl_mask.png"))[288:480, 410:614])
    assert [r["kind"] for r in original.meta["crops"]] == ["halfbody", "face"]
    assert original.meta["crops"][1]["crop"] == [410, 288, 614, 480]


def test_small_pictures_and_crops_below_the_resolution_get_none(tmp_path, models):
    step = CropsStep.configure({"face_model": str(models["face"]), "padding": 0})
    c = ctx(tmp_path, resolution=512)
    step.setup(c)
    small = caption_item(tmp_path, size=(400, 600), mask=False)
    assert step.process(small, c) is small  # 240,000 pixels < 512 x 512
    out = step.process(caption_item(tmp_path, mask=False), c)  # the face crop is 204 x 192 < 512 x 512
    assert isinstance(out, Item) and "fewer than 262144 pixels" in out.meta["crops"][0]["skipped"]


def test_a_crop_that_is_nearly_the_whole_picture_is_not_added(tmp_path):
    model = build_detector(tmp_path / "big.onnx", [(0.5, 0.5, 0.95, 0.95, [-6.0])], labels=("person",))
    step = CropsStep.configure({"person_model": str(model)})
    c = ctx(tmp_path)
    step.setup(c)
    out = step.process(caption_item(tmp_path, mask=False), c)
    assert isinstance(out, Item) and "more than 80% of the picture" in out.meta["crops"][0]["skipped"]


def test_ratio_crops_have_the_asked_aspect_or_the_nearest_bucket(tmp_path, models):
    for ratio, expected in (("1:1", 1.0), ("3:4", 0.75)):
        step = CropsStep.configure({"face_model": str(models["face"]), "ratio": ratio})
        c = ctx(tmp_path)
        step.setup(c)
        _, face = step.process(caption_item(tmp_path, mask=False), c)
        w, h = face.pending_image.size
        assert abs(w / h - expected) < 0.01
    step = CropsStep.configure({"person_model": str(models["person"]), "ratio": "bucket", "padding": 0})
    c = ctx(tmp_path, resolution=512)
    step.setup(c)
    _, body = step.process(caption_item(tmp_path, mask=False), c)
    w, h = body.pending_image.size
    # the person box is 512 x 1075: kohya's nearest 512 bucket is 320 x 768 (or 384 x 640); a bucket aspect
    from lorakit.buckets import make_buckets

    assert min(abs(w / h - bw / bh) for bw, bh in make_buckets(512)) < 0.01


def test_max_crops_numbers_the_crops(tmp_path):
    model = build_detector(tmp_path / "two.onnx", [(0.3, 0.3, 0.4, 0.3, [-6.0]), (0.7, 0.7, 0.4, 0.3, [-6.5])],
                           labels=("head",))
    step = CropsStep.configure({"head_model": str(model), "max_crops": 2, "padding": 0})
    c = ctx(tmp_path)
    step.setup(c)
    _, *crops = step.process(caption_item(tmp_path, mask=False), c)
    assert [i.name for i in crops] == ["girl_head1", "girl_head2"]
    assert all("portrait" in i.tags for i in crops)


def test_in_a_pipeline_crops_are_new_images_with_captions(tmp_path, models):
    src = tmp_path / "in"
    src.mkdir()
    red_picture((512, 768)).save(src / "girl.png")
    (src / "girl.txt").write_text("1girl, solo, full_body, boots, smile")
    red_picture((50, 50)).save(src / "small.png")
    res = run_step("crops", src, tmp_path / "out", {"face_model": str(models["face"]),
                                                     "person_model": str(models["person"])}, resolution=64)
    names = sorted(r.path for r in res.images)
    assert names == ["girl.png", "girl_face.png", "girl_full.png", "small.png"]
    assert res.caption("girl_face") == "1girl, solo, smile, close-up"
    assert res.caption("girl_full") == "1girl, solo, full_body, boots, smile"
    assert res.by_name("girl_face").meta["crop"]["kind"] == "face"
    assert res.open(res.by_name("girl_face")).size == tuple(np.subtract(
        res.by_name("girl_face").meta["crop"]["box"][2:], res.by_name("girl_face").meta["crop"]["box"][:2]))


def test_a_step_without_any_detector_is_refused():
    with pytest.raises(ParamError, match="at least one detector"):
        CropsStep.configure({})
    with pytest.raises(ParamError, match="ratio"):
        CropsStep.configure({"face_model": "x.onnx", "ratio": "wide"})


def test_an_uncached_hub_detector_offline_says_what_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    step = CropsStep.configure({"face_model": "deepghs/anime_face_detection:face_detect_v1.4_s/model.onnx"})
    with pytest.raises(ModelNotFound) as err:
        step.setup(ctx(tmp_path))
    assert "face_detect_v1.4_s/model.onnx" in str(err.value)
    assert "https://huggingface.co/deepghs/anime_face_detection" in str(err.value)


def test_boxes_chosen_by_hand_are_cut_as_given_without_detectors(tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"girl": [[10, 20, 310, 420], {"box": [400, 250, 620, 500], "kind": "face",
                                                                "name": "closeup"}]}))
    step = CropsStep.configure({"boxes": str(boxes)})
    c = ctx(tmp_path, resolution=512)  # manual boxes ignore the size limits
    step.setup(c)
    original, whole, face = step.process(caption_item(tmp_path, mask=False), c)
    assert whole.name == "girl_crop1" and whole.pending_image.size == (300, 400)
    assert whole.meta["crop"]["kind"] == "manual" and "boots" in whole.tags  # manual: no tag is removed
    assert face.name == "girl_closeup" and face.meta["crop"]["box"] == [400, 250, 620, 500]
    assert "boots" not in face.tags and "close-up" in face.tags
    assert [r["label"] for r in original.meta["crops"]] == ["manual", "manual"]


@pytest.mark.parametrize("content, words", [
    ('{"a": [[10, 10, 5, 50]]}', "x1 > x0"),
    ('{"a": [{"box": [0, 0, 5, 5], "kind": "feet"}]}', "kinds among"),
    ('{"a": [{"box": [0, 0, 5, 5], "name": "../x"}]}', "crop names"),
    ('[1, 2]', "JSON object"),
])
def test_bad_box_files_are_refused_naming_the_problem(tmp_path, content, words):
    path = tmp_path / "boxes.json"
    path.write_text(content)
    with pytest.raises(ParamError, match="boxes") as err:
        CropsStep.configure({"boxes": str(path)})
    assert words in str(err.value)
