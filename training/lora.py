"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's transformer layers, for training a large
checkpoint into a block-diffusion model whose trained part is small enough to ship.

Each adapted linear layer computes W x + (alpha / r) B A x with W frozen; B starts at zero, so the
adapted model starts as the checkpoint. The adapters live outside the model (forward hooks), so
the model's own weights, names and loading stay as they are; `merge` folds them into the weights.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from dllm_engine.config import ConfigError
from dllm_engine.loading import merge_low_rank
from dllm_engine.model import DiffusionLM

# The linear layers of each transformer block (fused: q/k/v is one, the SiLU gate and up one).
TARGETS = ("qkv_proj", "attn_out", "ff_in", "ff_out")


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names may not hold dots


class LoRA(nn.Module):
    """Rank-`rank` adapters on every TARGETS layer of `model`'s blocks, hooked into its forward
    (training freezes the model's own weights: `model.requires_grad_(False)`)."""

    def __init__(self, model: DiffusionLM, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ConfigError(f"a LoRA rank must be >= 1, got {rank}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.a, self.b = nn.ParameterDict(), nn.ParameterDict()
        self.layers: dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and ".blocks." in name and name.rsplit(".", 1)[-1] in TARGETS:
                key = _key(name)
                w = module.weight
                self.a[key] = nn.Parameter(torch.empty(rank, w.shape[1], device=w.device))
                nn.init.kaiming_uniform_(self.a[key], a=math.sqrt(5))  # as nn.Linear's own init
                self.b[key] = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device))
                self.layers[key] = module
        self._hooks = [m.register_forward_hook(self._hook(k)) for k, m in self.layers.items()]

    def _hook(self, key: str):
        def add(module: nn.Linear, inputs: tuple[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            return out + (x @ self.a[key].to(x.dtype).T) @ (self.b[key].to(x.dtype).T * self.scale)

        return add

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapters by layer name: `<layer>.lora_a` and `<layer>.lora_b`."""
        return {f"{k.replace('__', '.')}.lora_{ab}": p.detach() for ab, ps in (("a", self.a), ("b", self.b)) for k, p in ps.items()}

    def merge(self) -> None:
        """Fold the adapters into the model's weights and unhook them: the model is plain again."""
        merge_low_rank({k.replace("__", "."): m for k, m in self.layers.items()}, self.tensors(), self.scale)
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def save(self, path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """The adapters alone, by layer name (what is shipped: the base checkpoint comes from
        elsewhere); `dllm_engine.loading.merge_adapter` folds them into a model."""
        tensors = {k: t.to("cpu", dtype).contiguous() for k, t in self.tensors().items()}
        save_file(tensors, str(path), metadata={"rank": str(self.rank), "alpha": str(self.alpha)})
