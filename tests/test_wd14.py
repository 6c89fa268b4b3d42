"""WD14 tagger: a tiny ONNX model with the real input/output signature, real onnxruntime."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lorakit.plugin_sdk import Item, LorakitError, ModelNotFound, StepContext  # noqa: E402
from lorakit.plugins._tagging import combine_tags, format_tag, is_namespaced  # noqa: E402
from lorakit.plugins.wd14 import WD14Step, mcut_threshold, prepare_image  # noqa: E402

# name, category, weights on the (B, G, R) channel means in 0..1, bias. score = sigmoid(w.x + b)
TAGS = [
    ("general", 9, (0, 0, 0), 2.0),
    ("sensitive", 9, (0, 0, 0), 0.0),
    ("questionable", 9, (0, 0, 0), -1.0),
    ("explicit", 9, (0, 0, 0), -3.0),
    ("red_theme", 0, (0, 0, 6), -3.0),
    ("blue_theme", 0, (6, 0, 0), -3.0),
    ("long_hair", 0, (0, 0, 0), 0.0),          # 0.5 everywhere
    ("looking_at_viewer", 0, (0, 0, 0), -1.0),  # 0.269 everywhere
    ("^_^", 0, (0, 0, 0), 1.5),                 # 0.818 everywhere
    ("hatsune_miku_(append)", 4, (0, 6, 0), -3.0),
    ("kagamine_rin", 4, (0, 0, 0), 1.0),        # 0.731: under the 0.85 default
]


def build_tagger(folder: Path, size: int = 448, tags=TAGS, batch=None, csv_rows=None) -> Path:
    """Save model.onnx (NHWC input -> mean pool -> MatMul -> Sigmoid) and selected_tags.csv."""
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    n = len(tags)
    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # (3, n), input is 0..255
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    graph = helper.make_graph(
        [
            # Two-stage mean (rows, then columns) keeps float32 accumulation error tiny.
            helper.make_node("ReduceMean", ["input", "axis1"], ["rows"], keepdims=0),
            helper.make_node("ReduceMean", ["rows", "axis1"], ["pooled"], keepdims=0),
            helper.make_node("MatMul", ["pooled", "W"], ["logits0"]),
            helper.make_node("Add", ["logits0", "b"], ["logits"]),
            helper.make_node("Sigmoid", ["logits"], ["output"]),
        ],
        "tiny_wd14",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch or "batch", size, size, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch or "batch", n])],
        initializer=[
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
            numpy_helper.from_array(weights, "W"),
            numpy_helper.from_array(bias, "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tag_id", "name", "category", "count"])
        for i, row in enumerate(csv_rows or [(t[0], t[1]) for t in tags]):
            writer.writerow([1000 + i, row[0], row[1], 100])
    return folder


def expected_scores(bgr_mean_0_255: np.ndarray) -> dict[str, float]:
    """The tiny model computed independently in numpy."""
    x = bgr_mean_0_255 / 255.0
    return {name: float(1 / (1 + np.exp(-(np.dot(w, x) + b)))) for name, _, w, b in TAGS}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tagger(tmp_path_factory.mktemp("wd14") / "tiny-tagger")


def make_ctx(tmp_path: Path) -> StepContext:
    return StepContext("wd14", tmp_path / "work", tmp_path / "tmp", tmp_path / "out", device="cpu")


def make_item(tmp_path: Path, name: str, color, size=(448, 448), **fields) -> Item:
    path = tmp_path / f"{name}.png"
    Image.new("RGB", size, color).save(path)
    return Item(name=name, path=path, **fields)


def tag_items(tmp_path, items, **options):
    step = WD14Step.configure({"model": str(options.pop("model", None) or tmp_path / "tiny-tagger"), **options})
    ctx = make_ctx(tmp_path)
    step.setup(ctx)
    return step.process_batch(items, ctx)


# ----- preprocessing ----------------------------------------------------------------------------
def test_preprocessing_pads_on_white_centres_and_converts_to_bgr():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(200, 300, 3), dtype=np.uint8)  # 300 wide, 200 high
    alpha = np.full((200, 300), 255, dtype=np.uint8)
    alpha[:, :50] = 0  # a fully transparent strip becomes white
    image = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")

    got = prepare_image(image, 300)

    flat = rgb.astype(np.float32).copy()
    flat[:, :50] = 255.0
    expected = np.full((300, 300, 3), 255.0, dtype=np.float32)
    expected[50:250, :, :] = flat  # (300 - 200) // 2 = 50 rows of white above
    expected = expected[:, :, ::-1]
    assert got.dtype == np.float32 and got.shape == (300, 300, 3)
    np.testing.assert_array_equal(got, expected)


def test_preprocessing_blends_half_transparent_pixels_on_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 200, 128))
    got = prepare_image(image, 8)
    a = 128 / 255
    expected_bgr = np.array([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    np.testing.assert_allclose(got[0, 0], expected_bgr, atol=1.0)


def test_preprocessing_resizes_to_the_model_size():
    got = prepare_image(Image.new("RGB", (1000, 600), (10, 20, 30)), 448)
    assert got.shape == (448, 448, 3)
    np.testing.assert_allclose(got[224, 224], [30, 20, 10], atol=0.5)  # centre: the picture, BGR
    np.testing.assert_allclose(got[2, 224], [255, 255, 255], atol=0.5)  # top band: white padding


# ----- tagging ----------------------------------------------------------------------------------
def test_tags_and_scores_match_the_model_computed_independently(tmp_path, model_dir):
    item = make_item(tmp_path, "red", (255, 0, 0))
    out, = tag_items(tmp_path, [item], model=model_dir)
    scores = expected_scores(np.array([0.0, 0.0, 255.0]))
    general = {t: s for t, s in scores.items() if t in {"red_theme", "blue_theme", "long_hair", "looking_at_viewer", "^_^"}}
    wanted = [t for t, s in sorted(general.items(), key=lambda kv: -kv[1]) if s >= 0.35]
    assert list(out.tags) == wanted  # no character tag reaches 0.85; general by score
    for tag in wanted:
        assert out.tags[tag] == pytest.approx(scores[tag], abs=1e-3)
    assert "blue_theme" not in out.tags and "looking_at_viewer" not in out.tags


def test_character_tags_come_first_and_use_their_own_threshold(tmp_path, model_dir):
    item = make_item(tmp_path, "green", (0, 255, 0))
    out, = tag_items(tmp_path, [item], model=model_dir)
    assert list(out.tags)[0] == "hatsune_miku_(append)"  # sigmoid(3) = 0.95 >= 0.85
    assert "kagamine_rin" not in out.tags  # 0.73 < 0.85
    out2, = tag_items(tmp_path, [item], model=model_dir, character_threshold=0.7)
    assert list(out2.tags)[:2] == ["hatsune_miku_(append)", "kagamine_rin"]


def test_rating_goes_to_the_metadata_not_the_tags(tmp_path, model_dir):
    out, = tag_items(tmp_path, [make_item(tmp_path, "a", (255, 0, 0))], model=model_dir)
    assert out.meta["rating"] == "general"
    assert set(out.meta["rating_scores"]) == {"general", "sensitive", "questionable", "explicit"}
    assert "general" not in out.tags
    with_tag, = tag_items(tmp_path, [make_item(tmp_path, "b", (255, 0, 0))], model=model_dir, rating_tag=True)
    assert list(with_tag.tags)[0] == "general"


def test_thresholds_are_respected(tmp_path, model_dir):
    out, = tag_items(tmp_path, [make_item(tmp_path, "red", (255, 0, 0))], model=model_dir, general_threshold=0.6)
    assert "long_hair" not in out.tags  # 0.5
    assert "^_^" in out.tags  # 0.82


def test_mcut_cuts_at_the_largest_gap(tmp_path, model_dir):
    assert mcut_threshold(np.array([0.9, 0.85, 0.3, 0.25])) == pytest.approx(0.575)
    # Red image general scores: red 0.95, ^_^ 0.82, long_hair 0.5, looking 0.27, blue 0.05.
    out, = tag_items(tmp_path, [make_item(tmp_path, "red", (255, 0, 0))], model=model_dir, general_mcut=True)
    scores = expected_scores(np.array([0.0, 0.0, 255.0]))
    general = sorted((scores[t] for t in ("red_theme", "blue_theme", "long_hair", "looking_at_viewer", "^_^")), reverse=True)
    gaps = [a - b for a, b in zip(general, general[1:])]
    cut = general[int(np.argmax(gaps))]
    assert {t for t in out.tags} == {t for t in ("red_theme", "blue_theme", "long_hair", "looking_at_viewer", "^_^")
                                     if scores[t] >= cut}


def test_batched_results_equal_one_by_one_results(tmp_path, model_dir):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (120, 30, 200)]
    items = [make_item(tmp_path, f"i{n}", c, size=(448, 300 + 40 * n)) for n, c in enumerate(colors)]
    batched = tag_items(tmp_path, items, model=model_dir)
    single = [tag_items(tmp_path, [it], model=model_dir)[0] for it in items]
    assert [list(b.tags) for b in batched] == [list(s.tags) for s in single]
    for b, s in zip(batched, single):
        assert b.tags == pytest.approx(s.tags, abs=1e-4)


def test_a_broken_image_is_set_aside_and_the_batch_goes_on(tmp_path, model_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    items = [make_item(tmp_path, "ok", (255, 0, 0)), Item(name="bad", path=bad)]
    good, broken = tag_items(tmp_path, items, model=model_dir)
    assert "red_theme" in good.tags
    assert isinstance(broken, Exception) and "bad.png" in str(broken)


def test_spaces_style_keeps_emoticons_and_escapes_parentheses(tmp_path, model_dir):
    item = make_item(tmp_path, "green", (0, 255, 0))
    out, = tag_items(tmp_path, [item], model=model_dir, tag_style="spaces", escape_parentheses=True)
    assert "hatsune miku \\(append\\)" in out.tags
    assert "^_^" in out.tags and "long hair" in out.tags


def test_exclude_drops_tags_in_either_spelling(tmp_path, model_dir):
    out, = tag_items(tmp_path, [make_item(tmp_path, "r", (255, 0, 0))], model=model_dir, exclude="long hair, ^_^")
    assert "long_hair" not in out.tags and "^_^" not in out.tags and "red_theme" in out.tags


@pytest.mark.parametrize("mode, expected", [
    ("replace", ["red_theme", "^_^", "long_hair"]),
    ("append", ["solo", "long_hair", "red_theme", "^_^"]),
    ("union", ["red_theme", "^_^", "long_hair", "solo"]),
])
def test_combine_modes_with_existing_tags(tmp_path, model_dir, mode, expected):
    item = make_item(tmp_path, "r", (255, 0, 0), tags={"solo": None, "long hair": None})
    out, = tag_items(tmp_path, [item], model=model_dir, combine=mode)
    got = [t.replace(" ", "_") for t in out.tags]
    assert got == expected
    if mode == "append":
        assert out.tags["solo"] is None and out.tags["long hair"] is None  # booru tags keep no score
    if mode == "union":
        assert out.tags["long_hair"] == pytest.approx(0.5, abs=1e-3)  # found by both: the tagger's score


def test_input_size_is_read_from_the_model(tmp_path):
    folder = build_tagger(tmp_path / "small", size=64)
    out, = tag_items(tmp_path, [make_item(tmp_path, "r", (255, 0, 0), size=(30, 20))], model=folder)
    assert "red_theme" in out.tags


def test_a_fixed_batch_of_one_model_still_takes_batches(tmp_path):
    folder = build_tagger(tmp_path / "fixed", size=32, batch=1)
    items = [make_item(tmp_path, f"c{n}", c) for n, c in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)])]
    outs = tag_items(tmp_path, items, model=folder)
    assert ["red_theme" in o.tags for o in outs] == [True, False, False]
    assert ["blue_theme" in o.tags for o in outs] == [False, True, False]


def test_a_tag_list_that_does_not_match_the_model_is_refused(tmp_path):
    folder = build_tagger(tmp_path / "mismatch", size=32, csv_rows=[("a", 0), ("b", 0)])
    with pytest.raises(LorakitError, match="2 tags"):
        tag_items(tmp_path, [], model=folder)


def test_a_folder_without_the_model_files_names_what_is_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFound, match="selected_tags.csv"):
        tag_items(tmp_path, [], model=tmp_path / "empty")


def test_an_uncached_hub_model_offline_says_what_to_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub reads these once at import: set both the environment and its constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    step = WD14Step.configure({"model": "SmilingWolf/wd-vit-tagger-v3"})
    with pytest.raises(ModelNotFound) as err:
        step.setup(make_ctx(tmp_path))
    assert "model.onnx" in str(err.value) and "https://huggingface.co/SmilingWolf/wd-vit-tagger-v3" in str(err.value)


def test_cache_token_changes_when_the_model_file_changes(tmp_path):
    folder = build_tagger(tmp_path / "m", size=32)
    step = WD14Step.configure({"model": str(folder)})
    before = step.cache_token()
    build_tagger(folder, size=32, tags=[(n, c, w, b + 0.5) for n, c, w, b in TAGS])
    assert step.cache_token() != before


def test_bad_thresholds_are_refused_before_any_work():
    from lorakit.plugin_sdk import ParamError

    with pytest.raises(ParamError, match="general_threshold"):
        WD14Step.configure({"general_threshold": 1.5})


# ----- shared tag text conventions --------------------------------------------------------------
def test_tag_formatting_conventions():
    assert format_tag("long hair", "underscores") == "long_hair"
    assert format_tag("long_hair", "spaces") == "long hair"
    assert format_tag("o_o", "spaces") == "o_o"
    assert format_tag("ganyu_(genshin_impact)", "underscores", True) == "ganyu_\\(genshin_impact\\)"
    assert format_tag("ganyu_\\(genshin_impact\\)", "underscores", True) == "ganyu_\\(genshin_impact\\)"


def test_namespaced_tags_are_recognised_but_colon_tags_are_not():
    assert is_namespaced("artist:foo") and is_namespaced("rating:safe")
    assert not is_namespaced("re:zero_kara_hajimeru_isekai_seikatsu") and not is_namespaced(":d")


def test_combine_matches_tags_across_spellings():
    merged = combine_tags({"long hair": None}, {"long_hair": 0.9, "solo": 0.8}, "append")
    assert merged == {"long hair": None, "solo": 0.8}


def test_the_step_is_registered_through_the_entry_point():
    from lorakit.host import load_host

    host = load_host()
    assert host.steps["wd14"] is WD14Step


def test_an_unknown_device_is_refused_before_any_work():
    from lorakit.plugin_sdk import ParamError

    with pytest.raises(ParamError, match="device"):
        WD14Step.configure({"device": "gpu"})
    assert WD14Step.configure({"device": "cuda:1"}).options.device == "cuda:1"


def test_the_model_runs_one_image_at_a_time_on_the_cpu_and_in_batches_when_asked(tmp_path, model_dir):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (120, 30, 200), (9, 9, 9)]
    items = [make_item(tmp_path, f"i{n}", c) for n, c in enumerate(colors)]
    seen: dict[int, list[int]] = {}
    results = {}
    for batch_size in (0, 3):
        step = WD14Step.configure({"model": str(model_dir), "batch_size": batch_size})
        step.setup(make_ctx(tmp_path))
        real = step.scores
        step.scores = lambda batch, real=real, b=batch_size: seen.setdefault(b, []).append(len(batch)) or real(batch)
        results[batch_size] = step.process_batch(items, make_ctx(tmp_path))
    assert seen[0] == [1, 1, 1, 1, 1]   # the CPU default: no batch, no activations x16 in memory
    assert sorted(seen[3]) == [2, 3]   # groups of 3 (the lanes may finish them in either order)
    assert [r.tags for r in results[0]] == [r.tags for r in results[3]]


def test_cpu_lanes_run_one_onnxruntime_thread_each_and_keep_the_input_order(tmp_path, model_dir):
    import threading

    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (120, 30, 200), (9, 9, 9), (200, 200, 0)]
    items = [make_item(tmp_path, f"i{n}", c) for n, c in enumerate(colors)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    items.insert(3, Item(name="bad", path=bad))
    step = WD14Step.configure({"model": str(model_dir), "device": "cpu", "cpu_threads": 3})
    step.setup(make_ctx(tmp_path))
    assert step.lanes == 3 and step.run_batch == 1
    assert step.session.get_session_options().intra_op_num_threads == 1
    threads = set()
    real = step.scores
    step.scores = lambda batch: threads.add(threading.current_thread().name) or real(batch)
    results = step.process_batch(items, make_ctx(tmp_path))
    assert len(threads) > 1 and all(t.startswith("wd14-lane") for t in threads)
    assert isinstance(results[3], Exception) and "bad.png" in str(results[3])
    one = WD14Step.configure({"model": str(model_dir), "device": "cpu", "cpu_threads": 1})
    one.setup(make_ctx(tmp_path))
    alone = [one.process_batch([it], make_ctx(tmp_path))[0] for it in items if it.name != "bad"]
    assert [r.name for r in results if not isinstance(r, Exception)] == [a.name for a in alone]
    assert [r.tags for r in results if not isinstance(r, Exception)] == [a.tags for a in alone]


def test_preprocessing_of_an_opaque_picture_equals_the_composited_one():
    rng = np.random.default_rng(4)
    rgb = Image.fromarray(rng.integers(0, 256, size=(120, 90, 3), dtype=np.uint8))
    rgba = rgb.convert("RGBA")  # alpha 255 everywhere: the reference code composites it on white
    np.testing.assert_array_equal(prepare_image(rgb, 64), prepare_image(rgba, 64))
    grey = rgb.convert("L")
    np.testing.assert_array_equal(prepare_image(grey, 64), prepare_image(grey.convert("RGBA"), 64))


def test_the_cpu_default_is_one_lane_on_every_core_decoding_ahead_in_order(tmp_path, model_dir, monkeypatch):
    import threading

    import lorakit.plugins.wd14 as wd14

    monkeypatch.setattr(wd14, "cpu_cores", lambda: 4)   # the affinity mask a 4-core machine would give
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (120, 30, 200), (9, 9, 9)]
    items = [make_item(tmp_path, f"i{n}", c, size=(448, 320 + 20 * n)) for n, c in enumerate(colors)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"broken")
    items.insert(2, Item(name="bad", path=bad))
    step = WD14Step.configure({"model": str(model_dir), "device": "cpu"})   # the CPU default: one lane
    step.setup(make_ctx(tmp_path))
    assert step.lanes == 1 and step.run_batch == 1
    assert step.session.get_session_options().intra_op_num_threads == 4   # the cores, not 1
    two = WD14Step.configure({"model": str(model_dir), "device": "cpu", "cpu_threads": 2})
    two.setup(make_ctx(tmp_path))
    assert two.session.get_session_options().intra_op_num_threads == 2    # shared out between the lanes
    decoders, runners = set(), set()
    real_prepare, real_scores = step._prepare, step.scores
    step._prepare = lambda item: decoders.add(threading.current_thread().name) or real_prepare(item)
    step.scores = lambda batch: runners.add(threading.current_thread().name) or real_scores(batch)
    results = step.process_batch(items, make_ctx(tmp_path))
    assert decoders and all(t.startswith("wd14-decode") for t in decoders)   # decoding off the model's thread
    assert runners == {threading.current_thread().name}
    assert isinstance(results[2], Exception) and "bad.png" in str(results[2])
    good = [r for r in results if not isinstance(r, Exception)]
    assert [r.name for r in good] == [it.name for it in items if it.name != "bad"]
    alone = [step.process(it, make_ctx(tmp_path)) for it in items if it.name != "bad"]
    assert [list(r.tags) for r in good] == [list(a.tags) for a in alone]
    assert [r.tags for r in good] == [pytest.approx(a.tags, abs=1e-5) for a in alone]
