"""`kiln generate CHECKPOINT --prompt TEXT`: the continuation (or, for translate, the translation)
of a prompt by a trained model, rebuilt from its checkpoint without flags."""

from __future__ import annotations

import torch

from kiln.train import checkpoint
from kiln.train.run import load
from kiln.train.tasks import get_task


def generate_from_checkpoint(path: str, prompt: str, max_new_tokens: int = 200, temperature: float = 1.0,
                             top_k: int | None = None, top_p: float | None = None, num_beams: int = 1,
                             seed: int | None = None, device: str = "cpu") -> str:
    task = get_task(checkpoint.load(path, map_location="cpu")["config"]["task"])
    model = load(path, map_location=device)
    sampling = seed is not None or temperature != 1.0 or top_k is not None or top_p is not None
    decoding = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "num_beams": num_beams,
                "do_sample": sampling and num_beams == 1}
    if decoding["do_sample"]:
        decoding["generator"] = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
    return task.generate_text(model, prompt, max_new_tokens=max_new_tokens, **decoding)
