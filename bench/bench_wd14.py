"""WD14 tagging on the CPU: lorakit's step against the loop the A1111 tagger and imgutils run.

    python bench/bench_wd14.py                  # 48 pictures, 3 interleaved rounds
    python bench/bench_wd14.py --images 96 --rounds 5 --channels 64

No real tagger can be downloaded here, so the model is a random convnet with the real WD14
signature (NHWC 448x448x3 BGR 0..255 in, one sigmoid per tag out, 10,000 tags) and a realistic
amount of work per image (five stride-2 convolutions, about 1-4 GFLOP depending on --channels).
The pictures are JPEGs of 1200x1600 (decoding them is part of the work, as in a real dataset).

Each run is its own process (peak memory is its VmHWM), in the order A B C A B C ...:
* A  `loop`: for each file, decode + preprocess, then `session.run` on a batch of one (default
  onnxruntime options): what the A1111 tagger extension and imgutils do.
* B  `lorakit`: WD14Step.process_batch as the runner calls it (16 images a call), defaults:
  one image per model run on the CPU, decoding in a helper thread, explicit thread options.
* C  `lorakit batch 16`: the same step with batch_size 16 (the old behaviour).
Both sides use the same preprocessing function and produce the same tags (checked).
Reported: the median of each round's time ratio against A, with min and max, and peak memory.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, channels: int, tags: int = 10_000) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [helper.make_node("Transpose", ["input"], ["x0"], perm=[0, 3, 1, 2])], []
    c_in, name = 3, "x0"
    widths = [channels // 2, channels, channels * 2, channels * 4, channels * 8]
    for k, c_out in enumerate(widths):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) / np.sqrt(c_in * 9 * 255.0 if k == 0 else c_in * 9))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{k}")]
        nodes += [helper.make_node("Conv", [name, f"w{k}", f"b{k}"], [f"c{k}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"])]
        c_in, name = c_out, f"r{k}"
    inits += [numpy_helper.from_array((rng.standard_normal((c_in, tags)) / np.sqrt(c_in)).astype(np.float32), "W")]
    nodes += [helper.make_node("GlobalAveragePool", [name], ["pool"]),
              helper.make_node("Flatten", ["pool"], ["flat"]),
              helper.make_node("MatMul", ["flat", "W"], ["logits"]),
              helper.make_node("Sigmoid", ["logits"], ["output"])]
    graph = helper.make_graph(nodes, "bench_wd14",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 448, 448, 3])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", tags])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    with open(folder / "selected_tags.csv", "w", encoding="utf-8") as fh:
        fh.write("tag_id,name,category,count\n")
        for i in range(tags):
            fh.write(f"{i},tag_{i},{9 if i < 4 else 0},1000\n")


def build_images(folder: Path, count: int) -> list[Path]:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        base = (rng.random((6, 8, 3)) * 255).astype(np.uint8)
        im = Image.fromarray(base).resize((1200, 1600), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x, y = int(rng.integers(0, 1100)), int(rng.integers(0, 1500))
            draw.ellipse((x, y, x + 200, y + 150), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        path = folder / f"img{i:03d}.jpg"
        im.save(path, quality=90)
        paths.append(path)
    return paths


WORKER = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
mode, model, images = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
from lorakit.plugins.wd14 import WD14Step, prepare_image
from lorakit.plugin_sdk import Item, StepContext, open_image
work = Path(tempfile.mkdtemp())
ctx = StepContext("wd14", work, work, work, device="cpu")
step = WD14Step.configure({"model": model, "batch_size": 16 if mode == "lorakit-batch16" else 0, "device": "cpu",
                           "general_threshold": 0.5})
t0 = time.perf_counter()
tags = []
if mode == "loop":
    import onnxruntime as ort
    session = ort.InferenceSession(model + "/model.onnx", providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    step.setup(ctx)  # for its tag selection only; the model runs through `session` below
    for p in images:
        scores = session.run(None, {name: prepare_image(open_image(p), 448)[None]})[0][0]
        tags.append(sorted(step.tags_for(scores)[0]))
else:
    step.setup(ctx)
    items = [Item(name=str(i), path=Path(p)) for i, p in enumerate(images)]
    for k in range(0, len(items), 16):  # what the runner hands over
        tags += [sorted(item.tags) for item in step.process_batch(items[k:k + 16], ctx)]
seconds = time.perf_counter() - t0
peak = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) / 1024
print(json.dumps({"seconds": seconds, "peak_mib": peak, "tags": tags}))
"""

def run(mode: str, model: Path, images: list[Path]) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, mode, str(model), json.dumps([str(p) for p in images])],
                         capture_output=True, text=True, check=True, cwd=str(ROOT))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--channels", type=int, default=64, help="width of the first convolutions (64: ~2 GFLOP)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model, images = Path(tmp) / "model", build_images(Path(tmp) / "images", args.images)
        build_model(model, args.channels)
        modes = ["loop", "lorakit", "lorakit-batch16"]
        runs: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                runs[m].append(run(m, model, images))
        print(f"{args.images} JPEGs 1200x1600, random convnet with the WD14 signature (channels {args.channels}), "
              f"{os.cpu_count()} CPU cores, {args.rounds} interleaved rounds; onnxruntime "
              f"{__import__('onnxruntime').__version__}")
        print(f"\n{'run':18} {'median s':>9} {'img/s':>7} {'speed vs loop (median, min-max)':>34} {'peak MiB':>9}")
        for m in modes:
            secs = [r["seconds"] for r in runs[m]]
            ratios = [a["seconds"] / r["seconds"] for a, r in zip(runs["loop"], runs[m])]
            peak = max(r["peak_mib"] for r in runs[m])
            print(f"{m:18} {statistics.median(secs):9.2f} {args.images / statistics.median(secs):7.1f} "
                  f"{statistics.median(ratios):20.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) {peak:9.0f}")
        same = all(r["tags"] == runs["loop"][0]["tags"] for m in modes for r in runs[m])
        print(f"\nsame tags on every run: {same}")
        loop_peak = max(r["peak_mib"] for r in runs["loop"])
        print(f"memory vs loop: lorakit {max(r['peak_mib'] for r in runs['lorakit']) / loop_peak:.2f}x, "
              f"batch 16 {max(r['peak_mib'] for r in runs['lorakit-batch16']) / loop_peak:.2f}x")


if __name__ == "__main__":
    main()
