"""buckets: kohya's bucket set and assignment, the report, and the optional resize/sort/pad."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from lorakit.buckets import make_buckets, select_bucket
from lorakit.plugin_sdk import Item, ParamError, StepContext
from lorakit.plugin_sdk.testing import run_step
from lorakit.plugins.buckets import BucketsStep

# sd-scripts' buckets at 512 with min 256, max 1024, step 64 (17 of them).
KOHYA_512 = [(256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
             (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
             (1024, 256)]


def kohya_reference(width, height, resos):
    """sd-scripts BucketManager.select_bucket (no_upscale=False), restated with numpy as it is written there."""
    aspect = width / height
    if (width, height) in set(resos):
        reso = (width, height)
    else:
        errors = np.array([w / h for w, h in resos]) - aspect
        reso = resos[int(np.abs(errors).argmin())]
    scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
    return reso, (int(width * scale + 0.5), int(height * scale + 0.5))


def test_bucket_set_at_512_is_kohyas():
    assert make_buckets(512, 256, 1024, 64) == KOHYA_512


@pytest.mark.parametrize("resolution,max_size", [(512, 1024), (768, 1024), (1024, 1024), (1024, 2048)])
def test_bucket_assignment_matches_kohyas_for_random_sizes(resolution, max_size):
    resos = make_buckets(resolution, 256, max_size, 64)
    rng = np.random.default_rng(resolution + max_size)
    sizes = [tuple(int(v) for v in rng.integers(16, 5000, 2)) for _ in range(3000)] + resos
    for w, h in sizes:
        choice = select_bucket(w, h, resos)
        assert (choice.bucket, choice.resized) == kohya_reference(w, h, resos), (w, h)


def dataset(tmp_path, sizes):
    src = tmp_path / "in"
    src.mkdir()
    for name, (w, h) in sizes.items():
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
        arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
        Image.fromarray(arr).save(src / f"{name}.png")
    return src


def test_buckets_report_lists_assignments_counts_and_too_small(tmp_path):
    src = dataset(tmp_path, {"wide": (1000, 600), "square": (700, 700), "tiny": (300, 200)})
    res = run_step("buckets", src, tmp_path / "out", resolution=512)
    report = json.loads((tmp_path / "out" / "reports" / "buckets-buckets.json").read_text())
    assert report["bucket_count"] == 17 and report["resolution"] == 512
    by_name = {r["name"]: r for r in report["images"]}
    assert by_name["wide"]["bucket"] == "640x384" and by_name["wide"]["resized"] == [640, 384]
    assert by_name["square"]["bucket"] == "512x512"
    assert by_name["tiny"]["bucket"] == "640x384" and by_name["tiny"]["resized"] == [640, 427]
    assert [t["name"] for t in report["too_small"]] == ["tiny"]
    assert report["used"] == {"640x384": 2, "512x512": 1}
    assert res.by_name("wide").meta["bucket"] == [640, 384]
    # Without --resize the pictures are untouched.
    assert res.path(res.by_name("wide")).read_bytes() == (src / "wide.png").read_bytes()
    assert any("should be upscaled" in m for m in next(s for s in res.stats if s.name == "buckets").messages)


def test_buckets_uses_the_pipeline_resolution(tmp_path):
    src = dataset(tmp_path, {"photo": (1200, 900)})
    run_step("buckets", src, tmp_path / "out", resolution=1024)
    report = json.loads((tmp_path / "out" / "reports" / "buckets-buckets.json").read_text())
    assert report["resolution"] == 1024 and report["bucket_count"] == 25
    assert report["images"][0]["bucket"] == "1024x768"


def test_buckets_resize_scales_to_cover_and_centre_crops(tmp_path):
    src = dataset(tmp_path, {"wide": (1000, 600)})
    res = run_step("buckets", src, tmp_path / "out", {"resize": True}, resolution=512)
    rec = res.by_name("wide")
    assert (rec.width, rec.height) == (640, 384)
    # 1000x600 -> 640x384 exactly (same aspect): no crop, the horizontal ramp still spans 0..255.
    arr = np.asarray(res.open(rec))
    assert arr[0, 0, 0] < 5 and arr[0, -1, 0] > 250


def test_buckets_resize_crops_the_excess_from_both_sides(tmp_path):
    src = dataset(tmp_path, {"pano": (1200, 400)})  # 3:1 -> bucket 832x256 (3.25), scaled to 832x277
    res = run_step("buckets", src, tmp_path / "out", {"resize": True}, resolution=512)
    rec = res.by_name("pano")
    assert (rec.width, rec.height) == (832, 256)
    arr = np.asarray(res.open(rec)).astype(int)
    # 21 rows cut, 10 at the top: the vertical ramp (green) starts about 10/276*255 = 9 in.
    assert 5 <= arr[0, 400, 1] <= 14 and 241 <= arr[-1, 400, 1] <= 250


def test_buckets_sort_puts_images_in_bucket_folders(tmp_path):
    src = dataset(tmp_path, {"wide": (1000, 600), "square": (700, 700)})
    res = run_step("buckets", src, tmp_path / "out", {"sort": True}, resolution=512)
    assert sorted(r.path for r in res.images) == ["512x512/square.png", "640x384/wide.png"]


def test_buckets_pad_square_pads_on_white_and_uses_the_square_bucket(tmp_path):
    src = dataset(tmp_path, {"tall": (300, 600)})
    res = run_step("buckets", src, tmp_path / "out", {"pad_square": True}, resolution=512)
    rec = res.by_name("tall")
    assert (rec.width, rec.height) == (600, 600) and rec.meta["bucket"] == [512, 512]
    im = res.open(rec)
    assert im.getpixel((10, 300)) == (255, 255, 255)  # padding
    assert im.getpixel((150, 0)) != (255, 255, 255)  # the original starts at x = 150


def test_buckets_transforms_masks_with_their_images(tmp_path):
    image = tmp_path / "a.png"
    mask = tmp_path / "a_mask.png"
    Image.new("RGB", (300, 600), "red").save(image)
    Image.new("L", (300, 600), 255).save(mask)
    work, tmp = tmp_path / "work", tmp_path / "tmp"
    tmp.mkdir()
    ctx = StepContext("buckets", work, tmp, tmp_path / "out", resolution=512)
    step = BucketsStep.configure({"pad_square": True, "resize": True})
    (out,) = step.run([Item(name="a", path=image, mask=mask)], ctx)
    new_image, new_mask = Image.open(out.path), Image.open(out.mask)
    assert new_image.size == new_mask.size == (512, 512)
    assert new_mask.getpixel((5, 256)) == 0 and new_mask.getpixel((256, 256)) == 255


def test_buckets_refuses_min_size_above_max_size():
    with pytest.raises(ParamError, match="min_size"):
        BucketsStep.configure({"min_size": 1024, "max_size": 512})
