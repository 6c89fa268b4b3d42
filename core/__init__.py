"""lorakit: from a folder of pictures (or a booru search) to a trained LoRA in one pipeline."""
__version__ = "0.1.0"
