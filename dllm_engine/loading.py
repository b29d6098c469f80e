"""Load and save Hugging Face-layout model directories (config.json, *.safetensors, tokenizer).

Large checkpoints load without two copies in memory: the model is built on the meta device and
each tensor, read from a memory-mapped safetensors file, is assigned to its parameter directly.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ConfigError, LLaDAConfig, read_json, uses_hf_names
from .decoding import POLICIES, DecodeParams
from .model import Block, DiffusionLM, hf_name
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"  # the model shipped inside the package
# Everyday exchanges an int8 model calibrates on (`DiffusionLM.smooth`): activations as chat turns have them.
CALIBRATION_CHATS = [
    ("Hello, how are you today?", "I'm doing well, thank you for asking! How about you?"),
    ("Can you tell me a fun fact about the ocean?", "Sure! Most of the ocean floor has never been mapped in detail."),
    ("I was thinking about going hiking this weekend.", "That sounds lovely. Take water, good shoes and a map."),
    ("What should I cook for dinner tonight?", "How about a simple pasta with tomatoes, garlic and basil?"),
    ("My phone keeps running out of battery.", "Try lowering the screen brightness and closing apps you are not using."),
    ("Thanks, that was helpful. Goodbye!", "You're welcome! Have a great day."),
]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ["auto", *DTYPES, "int8"]  # what a model loads as (int8: fp32 with int8 linear layers, `load_model`)
INDEX_FILE = "model.safetensors.index.json"
T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` run on a short-lived thread: heavy torch work that is not the engine's.

    Why: PyTorch's CPU threads are an OpenMP team per thread that ever ran a multi-threaded op, kept
    for that thread's life. With two teams (the caller's and the engine thread's) on a small CPU,
    libgomp counts more threads than cores and stops spin-waiting between ops, and a small model's
    cached step, hundreds of short ops, slows down markedly. A team made here goes
    away with its thread, so the engine's is the only one left.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:  # leaving it joins the thread
        return pool.submit(fn, *args, **kwargs).result()


def device_of(name: str | torch.device) -> torch.device:
    """The torch device a --device / `device =` value names; a ConfigError where torch cannot
    parse it or it is CUDA on a machine without (torch's own error would come later, deep in a load)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {str(name)!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(name)!r}: CUDA is not available on this machine")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype a model's tensors run in: `auto` is bf16 on CUDA and on CPUs with native bf16
    matmuls, else fp32; `int8` (int8 linear layers) runs in fp32 around them."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "int8":
        return torch.float32
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and cpu_has_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively: where it does not, bf16 weights are slower than fp32."""
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text() or "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise ConfigError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"no *.safetensors weights in {directory}")
    return files


GENERATION_LIMITS = ("max_new_tokens", "max_prompt_tokens")
MODEL_DECODING = ("policy", "block_size")


def generation_defaults(directory: str | Path) -> dict[str, int | str]:
    """What a model directory's generation_config.json (HF's file of generation defaults) says about
    decoding it, in this project's keys, where it says it. The reply canvas (`max_new_tokens`) and
    prompt length (`max_prompt_tokens`) a small model was trained on: on a longer canvas it runs on,
    after a longer prompt it loses the thread. The decoding it was made for (`MODEL_DECODING`): a
    converted AR checkpoint decodes one token per forward until it is trained to draft (`dllm
    convert`, `dllm export` write them); flags and requests that choose their own win."""
    path = Path(directory) / "generation_config.json"
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        found = {key: raw[key] for key in (*GENERATION_LIMITS, *MODEL_DECODING) if raw.get(key) is not None}
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{path}: not a JSON object: {e}") from None
    for key, value in found.items():
        if key == "policy":
            if value not in POLICIES:
                raise ConfigError(f"{path}: policy must be one of {', '.join(POLICIES)}, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {value!r}")
    return found


def model_params(directory: str | Path, base: DecodeParams = DecodeParams()) -> DecodeParams:
    """`base` with the policy and block size the model directory names (`generation_defaults`)."""
    return dataclasses.replace(base, **{k: v for k, v in generation_defaults(directory).items() if k in MODEL_DECODING})


def load_model(
    directory: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto", config_overrides: dict | None = None
) -> tuple[DiffusionLM, Tokenizer]:
    """The model and tokenizer of a directory; `config_overrides` change its config.json's values
    on the way in (an AR checkpoint's chosen mask token, see convert.py). `dtype` "int8" loads
    fp32 weights and quantizes the linear layers (`DiffusionLM.quantize_int8`, a CPU only)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"model directory {directory} does not exist")
    device = device_of(device)
    int8 = dtype == "int8"
    dtype = resolve_dtype(dtype, device)
    raw = {**read_json(directory / "config.json"), **(config_overrides or {})}
    cfg = LLaDAConfig.from_dict(raw)
    # transformers' names map to LLaDA's; a tied checkpoint may still carry its output head.
    rename = (lambda name: None if name == "lm_head.weight" and cfg.weight_tying else hf_name(name)) if uses_hf_names(raw) else (lambda name: name)
    tokenizer = Tokenizer(directory, cfg)
    cfg.end_of_turn_token_id = tokenizer.special.end_of_turn  # what the tokenizer resolved: turn blocks end there
    with torch.device("meta"):
        model = DiffusionLM(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    source: dict[str, Path] = {}  # which file each tensor came from, to refuse duplicates
    for path in _weight_files(directory):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    ours = rename(name)
                    if ours is None:
                        continue
                    if ours not in expected:
                        raise ConfigError(f"{path.name}: unexpected weight {name!r} (not in the layout this config describes)")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != tuple(expected[ours]):
                        raise ConfigError(f"{path.name}: weight {name!r} has shape {shape}, config expects {tuple(expected[ours])}")
                    if ours in source:  # a later shard would silently replace the earlier tensor
                        raise ConfigError(f"weight {name!r} appears in both {source[ours].name} and {path.name}")
                    source[ours] = path
                    state[ours] = f.get_tensor(name).to(device=device, dtype=dtype)
        except ConfigError:
            raise
        except Exception as e:  # safetensors reports corrupt headers/data as generic errors
            raise ConfigError(f"cannot read weights from {path}: {e}") from None
    missing = sorted(set(expected) - set(state))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"checkpoint in {directory} lacks weight(s): {shown}")
    for prefix, module in model.named_modules():
        if isinstance(module, Block):  # here, not in load_state_dict's copy of `state`: one copy of the weights at a time
            module.join_fused(state, f"{prefix}.")
    model.load_state_dict(state, assign=True, strict=True)
    model.eval().requires_grad_(False)
    if int8:
        model.quantize_int8(calibration_rows(tokenizer))
    log.info("loaded %s: %.1fM parameters, %s on %s", directory, model.n_params / 1e6, model.weight_format, device)
    return model, tokenizer


def calibration_rows(tokenizer: Tokenizer) -> list[torch.Tensor]:
    """`CALIBRATION_CHATS` as token ids, through the model's chat template where it has one."""
    rows = []
    for user, reply in CALIBRATION_CHATS:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], add_generation_prompt=False)
        else:
            ids = tokenizer.encode(f"{user} {reply}")
        rows.append(torch.tensor(ids))
    return rows


def merge_adapter(model: DiffusionLM, path: str | Path) -> None:
    """Fold low-rank adapters (`training.lora.LoRA.save`: `<layer>.lora_a` / `.lora_b` per linear
    layer, `rank` and `alpha` in the metadata) into `model`'s weights: W += alpha / rank * B A.
    Why here: a shipped model may be a registry package's checkpoint plus a small adapter."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        scale = float(meta["alpha"]) / int(meta["rank"])
    except Exception as e:  # noqa: BLE001 (safetensors reports a corrupt header as a generic error)
        raise ConfigError(f"{path}: not a LoRA adapter file ({e})") from None
    merge_low_rank(dict(model.named_modules()), tensors, scale, str(path))


def merge_low_rank(layers: dict[str, torch.nn.Module], tensors: dict[str, torch.Tensor], scale: float, source: str = "the adapters") -> None:
    """W += scale * B A for each `<layer>.lora_a` / `<layer>.lora_b` pair of `tensors`, into the
    linear layers of that name; a ConfigError naming `source` if they do not fit."""
    names = {k.rsplit(".", 1)[0] for k in tensors}
    unknown = sorted(n for n in names if not isinstance(layers.get(n), torch.nn.Linear) or {f"{n}.lora_a", f"{n}.lora_b"} - set(tensors))
    if unknown or not names:
        raise ConfigError(f"{source} does not fit this model (no linear layer or pair for {unknown[:3] or 'any layer'})")
    with torch.no_grad():
        for n in names:
            w = layers[n].weight
            w += (tensors[f"{n}.lora_b"].float() @ tensors[f"{n}.lora_a"].float() * scale).to(w.device, w.dtype)


def save_model(model: DiffusionLM, directory: str | Path, dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 15 * 2**20) -> None:
    """Write weights as safetensors in LLaDA names, sharded with an index above `max_shard_bytes`."""
    if model.int8:
        raise ConfigError("an int8 model is for decoding only: save the model it was loaded from")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for old in directory.glob("*.safetensors"):
        old.unlink()
    (directory / INDEX_FILE).unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
