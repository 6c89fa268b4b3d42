"""bucket_no_upscale, random_crop and SDXL's crop conditioning, against values worked out by hand
from kohya's rules (train_util ``BucketManager.select_bucket``, ``trim_and_resize_if_required``,
``get_crop_ltrb`` and the ``crop_top_lefts`` of ``__getitem__``)."""
from __future__ import annotations

import random
import tomllib

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.buckets import make_buckets, sdxl_time_ids, select_bucket, select_bucket_no_upscale
from lorakit.manifest import Manifest
from lorakit.plugin_sdk import LorakitError
from lorakit.trainer import kohya_format
from lorakit.trainer.api import train, validate_settings
from lorakit.trainer.data import TrainImage, build_training_data, load_pixels
from tests.test_train import make_dataset, quiet, settings
from tests.tiny_models import build_tiny_sdxl


# ----- bucket_no_upscale ----------------------------------------------------------------------------
@pytest.mark.parametrize("size,resized,bucket", [
    # 60,000 px < 512²: kept as it is, the bucket is the size rounded down to 64.
    ((300, 200), (300, 200), (256, 192)),
    # 4:3 above 512²: to 591.2 x 443.4; width first gives 576x384 (1.5), height first 512x384 (4:3): height wins.
    ((1024, 768), (512, 384), (512, 384)),
    # 2:1: 724.1 x 362.0 -> 704x320 (2.2) or 640x320 (2.0).
    ((2000, 1000), (640, 320), (640, 320)),
    # 10:9: 539.7 x 485.7 -> 512x448 (1.143) or 448x448 (1.0): width wins, height 512 / (10/9) = 460.8 -> 461.
    ((1000, 900), (512, 461), (512, 448)),
])
def test_no_upscale_bucket_is_the_images_own_size_scaled_down_to_the_area_and_rounded_down(size, resized, bucket):
    choice = select_bucket_no_upscale(*size, 512 * 512, 64)
    assert (choice.resized, choice.bucket) == (resized, bucket)


def test_no_upscale_training_data_uses_only_the_buckets_the_images_make(tmp_path):
    dataset = make_dataset(tmp_path / "d")  # 64x64, 96x64, 64x128 and 64x64 again
    config = validate_settings({"resolution": 64, "bucket_reso_steps": 32, "bucket_no_upscale": True,
                                "min_bucket_reso": 64, "max_bucket_reso": 64})  # unused, as in kohya
    data = build_training_data(Manifest.load(dataset), config, 64)
    by_size = {image.size: (image.resized, image.bucket) for image in data.images}
    assert by_size[(64, 64)] == ((64, 64), (64, 64))
    # 96x64 has 6144 px > 64²: 78.4 x 52.3; width first rounds to 64 x 32 (aspect 2.0), height first to
    # 32 x 32 (1.0), both 0.5 from 1.5: on a tie kohya takes the height, 32, and the width 32 x 1.5 = 48.
    assert by_size[(96, 64)] == ((48, 32), (32, 32))
    # 64x128: 45.3 x 90.5 -> 32x64 both ways (exact), height first: resized 32x64, bucket 32x64.
    assert by_size[(64, 128)] == ((32, 64), (32, 64))
    assert data.buckets == [(32, 32), (32, 64), (64, 64)]
    plain = build_training_data(Manifest.load(dataset), config.replace(bucket_no_upscale=False, min_bucket_reso=32,
                                                                      max_bucket_reso=128), 64)
    assert len(plain.buckets) > len(data.buckets)  # the predefined set


def test_no_upscale_names_an_image_smaller_than_one_bucket_step(tmp_path):
    dataset = make_dataset(tmp_path / "d")
    manifest = Manifest.load(dataset)
    manifest.images[0].width, manifest.images[0].height = 20, 64
    with pytest.raises(LorakitError, match=r"outfit/000.png is 20x64, smaller than one bucket step \(32\)"):
        build_training_data(manifest, validate_settings({"bucket_reso_steps": 32, "bucket_no_upscale": True}), 64)


# ----- random_crop ---------------------------------------------------------------------------------
def _image(tmp_path, random_crop=True):
    rng = np.random.default_rng(1)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    return TrainImage(path=path, caption="x", subset="s", repeats=1, is_reg=False, size=(96, 64), bucket=(64, 64),
                      resized=(96, 64), random_crop=random_crop)


def test_random_crop_takes_every_offset_and_the_pixels_of_that_place(tmp_path):
    image = _image(tmp_path)
    rng = random.Random(0)
    offsets = {image.crop_for_sample(rng) for _ in range(400)}
    assert offsets == {(0, left) for left in range(33)}  # 96 - 64 + 1 places across, none down
    with Image.open(image.path) as im:
        full = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    for top, left in [(0, 0), (0, 17), (0, 32)]:
        pixels = load_pixels(image, False, (top, left)).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(pixels, full[top:top + 64, left:left + 64])
    centre = _image(tmp_path, random_crop=False)
    assert {centre.crop_for_sample(rng) for _ in range(20)} == {(0, 16)}


def test_random_crop_needs_uncached_latents_as_in_kohya():
    assert validate_settings({"random_crop": True}).cache_latents == "none"
    with pytest.raises(LorakitError, match="random_crop' needs cache_latents = none"):
        validate_settings({"random_crop": True, "cache_latents": "disk"}, "train.toml")


def test_a_run_with_no_upscale_and_random_crop_records_them_as_kohya(sd15, tmp_path):
    dataset = make_dataset(tmp_path / "d", subsets=(("outfit", 3, 1),))
    out = train(dataset, settings(sd15, tmp_path / "x.safetensors", max_train_steps=2, bucket_no_upscale=True,
                                  random_crop=True), console=quiet())
    _, meta = kohya_format.read(out)
    assert (meta["ss_bucket_no_upscale"], meta["ss_random_crop"], meta["ss_cache_latents"]) == ("True", "True", "False")
    import json

    (dataset_meta,) = json.loads(meta["ss_datasets"])
    assert all(s["random_crop"] is True for s in dataset_meta["subsets"])
    assert {tuple(b["resolution"]) for b in json.loads(meta["ss_bucket_info"])["buckets"].values()} == {
        (64, 64), (32, 32), (32, 64)}


def test_kohya_export_writes_bucket_no_upscale_and_random_crop(tmp_path):
    from lorakit.kohya import export_kohya_report
    from tests.kohya_config_schema import kohya_config_schema
    from tests.test_kohya_export import make_manifest

    report = export_kohya_report(make_manifest(tmp_path / "ds", masked=()), tmp_path / "out", bucket_no_upscale=True,
                                 random_crop=True)
    config = tomllib.loads(report.config.read_text(encoding="utf-8"))
    kohya_config_schema(masked_loss=False)(config)
    assert config["general"]["bucket_no_upscale"] is True
    assert all(s["random_crop"] is True for d in config["datasets"] for s in d["subsets"])
    masked = export_kohya_report(make_manifest(tmp_path / "ds2"), tmp_path / "out2", random_crop=True)
    config = tomllib.loads(masked.config.read_text(encoding="utf-8"))
    assert config["general"]["bucket_no_upscale"] is False
    masked_subsets = [s for d in config["datasets"] for s in d["subsets"] if "conditioning_data_dir" in s]
    assert masked_subsets and not any("random_crop" in s for s in masked_subsets)
    assert any("random_crop" in item for item in masked.lost)


# ----- SDXL crop conditioning ------------------------------------------------------------------------
@pytest.mark.parametrize("size,bucket,plain,flipped", [
    # 3:2 into 1216x832 (1.46): fitted inside, 1216 x 810.7 -> top (832 - 810.7) // 2 = 10, left 0.
    # (The crop actually taken is 16 px from the left of the 1248x832 cover resize.)
    ((1200, 800), (1216, 832), [800, 1200, 10, 0, 832, 1216], [800, 1200, 10, 0, 832, 1216]),
    # 2:3 into 832x1216: 810.7 x 1216 -> left 10, right 820.7; flipped the left is 832 - 820.7 = 11.3 -> 11.
    ((800, 1200), (832, 1216), [1200, 800, 0, 10, 1216, 832], [1200, 800, 0, 11, 1216, 832]),
    # upscaled 5:4 into 1152x896 (1.29): 1120 x 896 -> left 16, right 1136, flipped 1152 - 1136 = 16.
    ((500, 400), (1152, 896), [400, 500, 0, 16, 896, 1152], [400, 500, 0, 16, 896, 1152]),
    ((2000, 1000), (1408, 704), [1000, 2000, 0, 0, 704, 1408], [1000, 2000, 0, 0, 704, 1408]),
])
def test_sdxl_time_ids_are_kohyas_for_bucketed_resized_and_flipped_images(size, bucket, plain, flipped):
    assert select_bucket(*size, make_buckets(1024, 256, 2048, 64)).bucket == bucket
    assert sdxl_time_ids(size, bucket, False) == plain
    assert sdxl_time_ids(size, bucket, True) == flipped


def test_the_sdxl_trainer_conditions_each_image_on_kohyas_time_ids(tmp_path):
    from tests.test_train_maths import prepared

    sdxl = build_tiny_sdxl(tmp_path / "sdxl")
    dataset = make_dataset(tmp_path / "d", subsets=(("outfit", 3, 1),))
    trainer = prepared(dataset, settings(sdxl, tmp_path / "x.safetensors", random_crop=True, flip_aug=True))
    seen = {}
    for epoch in range(3):
        for batch_index, batch in enumerate(trainer.data_.epoch_samples(epoch, 0)):
            _, _, time_ids, _, _ = trainer.batch_inputs(batch, epoch, batch_index)
            image = trainer.data_.images[batch[0]]
            seen.setdefault(image.size, set()).add(tuple(int(v) for v in time_ids[0].tolist()))
    # 96x64 goes to the 64x64 bucket: fitted inside, 64 x 42.7 -> top 10; the random crop changes nothing.
    assert seen[(96, 64)] == {(64, 96, 10, 0, 64, 64)}
    # 64x128 goes to 32x96: 32 x 64 inside it -> top 16, left 0 (flipped too: 32 - 32).
    assert seen[(64, 128)] == {(128, 64, 16, 0, 96, 32)}
    assert seen[(64, 64)] == {(64, 64, 0, 0, 64, 64)}
    assert torch.is_tensor(time_ids)
