"""The built-in LoRA trainer. It reads a lorakit manifest (``lorakit.manifest``) and nothing else."""
