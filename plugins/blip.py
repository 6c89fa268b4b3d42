"""BLIP captioner: a natural-language sentence for each picture (transformers' BLIP models).

Good for photos and realistic pictures, where booru tags do not fit. The model is a transformers
folder or a Hugging Face repo id (weights must be ``model.safetensors``: pickled weights can run
code when loaded, so they are refused).
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from lorakit.plugin_sdk import ImageStep, Item, ModelNotFound, ModelRef, Param, ParamError, StepContext, hookimpl
from lorakit.plugin_sdk import chosen_device, device_param, model_file_digest, pick_device, resolve_model_files

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
REQUIRED_FILES = ["config.json", "model.safetensors"]
# Processor and tokenizer files; which of them a model has depends on the transformers version
# that saved it. Missing ones are simply not there; the processor says if it lacks something.
OPTIONAL_FILES = ["preprocessor_config.json", "processor_config.json", "tokenizer_config.json", "tokenizer.json",
                  "vocab.txt", "special_tokens_map.json", "generation_config.json"]
COMBINE_MODES = ("replace", "keep", "append")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (a plain RGB conversion turns it black)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


class BlipStep(ImageStep):
    """Caption each picture with a sentence from a BLIP model (default: BLIP large).

    The sentence becomes the caption text (after any tags). `prefix` is written before every
    sentence (e.g. your trigger word); `prompt` is text the model continues ("a photograph of").
    Beam search with `beams` > 1 gives steadier sentences; `min_length`/`max_length` are in tokens
    (a word is about 1.3 tokens). Runs on the GPU when there is one (half precision there).
    """

    name = "blip"
    summary = "Caption images with a BLIP sentence (transformers), optionally after a prefix."
    version = "1"
    workers = 1
    batch_size = 8
    reads = frozenset({"image", "caption"})
    writes = frozenset({"caption"})
    example = 'lorakit blip photos/ captioned/ --prefix "ohwx woman," --beams 3'
    params = [
        Param("model", ModelRef, DEFAULT_MODEL,
              "transformers BLIP captioning folder or Hugging Face repo id (needs model.safetensors)"),
        Param("prefix", str, "", "text written before every caption, e.g. the trigger: 'ohwx woman,'"),
        Param("prompt", str, "", "text the model continues, e.g. 'a photograph of' (kept in the caption)"),
        Param("min_length", int, 5, "shortest caption, in tokens", min=1),
        Param("max_length", int, 75, "longest caption, in tokens", min=2, max=512),
        Param("beams", int, 3, "beam search width; 1 = greedy decoding (fastest)", min=1, max=16),
        Param("repetition_penalty", float, 1.0, "above 1 discourages repeated words (1 = off)", min=1.0, max=5.0),
        Param("combine", str, "replace",
              "an existing caption: replace it, keep it (caption only pictures without one), or append after it",
              choices=COMBINE_MODES),
        Param("precision", str, "auto", "weights precision: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16",
              choices=PRECISIONS),
        device_param(),
        Param("batch_size", int, 0, "pictures per generate call (0 = by device: 1 on the CPU, 16 on CUDA)", min=0),
    ]

    @classmethod
    def configure(cls, given=None, where=None) -> "BlipStep":
        step = super().configure(given, where)
        o = step.options
        if o.min_length > o.max_length:
            raise ParamError(cls.name, "min_length", o.min_length, f"at most max_length ({o.max_length})", where)
        return step

    # ----- model --------------------------------------------------------------------------------
    def _model_folder(self) -> Path:
        files = resolve_model_files(self.options.model, REQUIRED_FILES, "blip captioning model")
        folder = files["config.json"].parent
        if not Path(str(self.options.model)).expanduser().is_dir():
            # A hub repo: fetch the processor files into the same snapshot folder (from the cache when offline).
            for name in OPTIONAL_FILES:
                try:
                    resolve_model_files(self.options.model, [name], "blip captioning model")
                except ModelNotFound:
                    pass
        return folder

    def cache_token(self) -> str:
        folder = self._model_folder()
        return "blip:" + ",".join(model_file_digest(folder / name) for name in REQUIRED_FILES)

    def setup(self, ctx: StepContext) -> None:
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        folder = self._model_folder()
        self.device = pick_device(chosen_device(self.options.device, ctx.device))
        precision = self.options.precision
        if precision == "auto":
            precision = "fp16" if self.device.startswith("cuda") else "fp32"
        self.dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        try:
            self.processor = BlipProcessor.from_pretrained(folder)
        except Exception as exc:
            raise ModelNotFound(f"blip captioning model: cannot load the processor/tokenizer from {folder} "
                                f"({type(exc).__name__}: {exc}); it needs {', '.join(OPTIONAL_FILES[:5])}") from None
        try:
            # safetensors only: pickled weights (pytorch_model.bin) can run code when loaded.
            model = BlipForConditionalGeneration.from_pretrained(folder, use_safetensors=True, dtype=self.dtype)
        except Exception as exc:
            raise ModelNotFound(f"blip captioning model: cannot load {folder / 'model.safetensors'} "
                                f"({type(exc).__name__}: {exc})") from None
        self.model = model.to(self.device).eval()
        on_gpu = self.device.startswith("cuda")
        # Device-sized batches: on CUDA many pictures per generate call; on the CPU one (the
        # cross-attention cache grows with pictures x beams, about 130 MB a picture at beams 3 for
        # BLIP large in fp32, and a batch's different float sums can flip a near-tie between two
        # beams: one picture a call gives exactly the captions of a per-picture loop).
        self.run_batch = self.options.batch_size or (16 if on_gpu else 1)
        self.batch_size = max(8, 2 * self.run_batch)  # pictures the runner hands over per call
        if not on_gpu:
            # All cores for torch's operators (its default counts physical cores, which a container
            # limit or taskset can narrow further); the decoding thread below takes little.
            from .wd14 import cpu_cores

            torch.set_num_threads(cpu_cores())

    # ----- captions -----------------------------------------------------------------------------
    def _inputs(self, images: list[Image.Image]) -> dict:
        """The model's inputs for a group of pictures: flattened on white, resized and normalised by
        the model's processor, on the device in the model's precision."""
        o = self.options
        texts = [o.prompt] * len(images) if o.prompt else None
        inputs = self.processor(images=[_flatten_on_white(im) for im in images], text=texts, return_tensors="pt")
        return {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                for k, v in inputs.items()}

    def _generate(self, inputs: dict) -> list[str]:
        import torch

        o = self.options
        with torch.inference_mode():
            out = self.model.generate(**inputs, num_beams=o.beams, min_length=o.min_length, max_length=o.max_length,
                                      repetition_penalty=o.repetition_penalty, do_sample=False)
        return [" ".join(text.split()) for text in self.processor.batch_decode(out, skip_special_tokens=True)]

    def captions(self, images: list[Image.Image]) -> list[str]:
        """BLIP sentences for a batch of pictures (one generate call)."""
        return self._generate(self._inputs(images))

    def _apply(self, item: Item, sentence: str) -> Item:
        o = self.options
        if o.prefix.strip():
            sentence = f"{o.prefix.strip()} {sentence}".strip()
        if o.combine == "append" and item.caption:
            sentence = f"{item.caption.rstrip()} {sentence}"
        return item.replace(caption=sentence)

    def process_batch(self, items: list[Item], ctx: StepContext) -> list:
        """Caption ``items`` in groups of ``run_batch``; a helper thread decodes and preprocesses
        the next group while the model generates for this one (PIL and torch release the GIL)."""
        from concurrent.futures import ThreadPoolExecutor

        results: list = [None] * len(items)
        todo = []
        for n, item in enumerate(items):
            if self.options.combine == "keep" and item.caption:
                results[n] = item
            else:
                todo.append(n)
        groups = [todo[i:i + self.run_batch] for i in range(0, len(todo), self.run_batch)]

        def prepare(group: list[int]):
            opened, good = [], []
            for n in group:
                try:
                    opened.append(items[n].open())
                    good.append(n)
                except Exception as exc:  # one broken picture is set aside; the batch goes on
                    results[n] = exc
            return good, (self._inputs(opened) if opened else None)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip-prepare") as pool:
            ahead = pool.submit(prepare, groups[0]) if groups else None
            for k in range(len(groups)):
                good, inputs = ahead.result()
                ahead = pool.submit(prepare, groups[k + 1]) if k + 1 < len(groups) else None
                if inputs is not None:
                    for n, sentence in zip(good, self._generate(inputs)):
                        results[n] = self._apply(items[n], sentence)
        return results

    def process(self, item: Item, ctx: StepContext) -> Item:
        result = self.process_batch([item], ctx)[0]
        if isinstance(result, BaseException):
            raise result
        return result


@hookimpl
def register_steps(register):
    register(BlipStep)
