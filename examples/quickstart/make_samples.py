"""Regenerates the quick start's sample pictures (simple drawn characters, public domain, made here).

They are committed, so you never need to run this; it documents where they came from.
Each exercises a step: white padding (trim), transparency (alpha), an animated GIF (convert),
a near-duplicate (dedupe), a tiny image (buckets/upscale report), and captions (tags, triggers).
"""
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).parent / "raw"


def character(size, hair, eyes, pad=0, bg="white", mode="RGB", scenery=None):
    w, h = size
    im = Image.new(mode, (w + 2 * pad, h + 2 * pad), bg)
    d = ImageDraw.Draw(im)
    ox, oy = pad, pad
    if scenery == "stripes":
        for x in range(0, w, 48):
            d.rectangle([ox + x, oy, ox + x + 20, oy + h], fill=(170, 200, 240, 255))
    elif scenery == "sun":
        d.rectangle([ox, oy + h * 0.7, ox + w, oy + h], fill=(90, 170, 80, 255))
        d.ellipse([ox + w * 0.02, oy + h * 0.02, ox + w * 0.2, oy + h * 0.2], fill=(250, 210, 40, 255))
    d.ellipse([ox + w * 0.25, oy + h * 0.1, ox + w * 0.75, oy + h * 0.55], fill=(250, 220, 200, 255))  # face
    d.pieslice([ox + w * 0.2, oy + h * 0.02, ox + w * 0.8, oy + h * 0.5], 180, 360, fill=hair)        # hair
    d.ellipse([ox + w * 0.36, oy + h * 0.3, ox + w * 0.44, oy + h * 0.38], fill=eyes)
    d.ellipse([ox + w * 0.56, oy + h * 0.3, ox + w * 0.64, oy + h * 0.38], fill=eyes)
    d.rectangle([ox + w * 0.3, oy + h * 0.55, ox + w * 0.7, oy + h * 0.98], fill=(40, 40, 160, 255))   # dress
    return im


def main():
    HERE.mkdir(exist_ok=True)
    captions = {}
    character((512, 640), (230, 120, 20, 255), (20, 120, 40, 255), pad=60).save(HERE / "001.png")
    captions["001"] = "1girl, solo, orange_hair, green_eyes, blue_dress, white_background, smile"
    character((576, 576), (230, 120, 20, 255), (20, 120, 40, 255), scenery="stripes").save(HERE / "002.jpg", quality=92)
    captions["002"] = "1girl, solo, orange_hair, green_eyes, blue_dress, short_hair, looking_at_viewer"
    near = Image.open(HERE / "002.jpg").resize((560, 560))
    near.save(HERE / "002_resaved.webp", quality=80)
    captions["002_resaved"] = "1girl, orange_hair, green_eyes, blue_dress"
    transparent = character((600, 600), (230, 120, 20, 255), (20, 120, 40, 255), bg=(0, 0, 0, 0), mode="RGBA")
    transparent.save(HERE / "003.png")
    captions["003"] = "1girl, solo, orange_hair, green_eyes, blue_dress, transparent_background, meme"
    frames = [character((320, 320), (230, 120, 20, 255), (20, 120, 40, 255), pad=20 + 25 * i, bg=(60 * i, 60, 120))
              for i in range(3)]
    frames[0].save(HERE / "004.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    captions["004"] = "1girl, orange_hair, green_eyes, animated"
    character((160, 200), (230, 120, 20, 255), (20, 120, 40, 255), scenery="sun").save(HERE / "005_small.png")
    captions["005_small"] = "1girl, solo, orange_hair, green_eyes, chibi"
    for stem, text in captions.items():
        (HERE / f"{stem}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
