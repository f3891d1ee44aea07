"""What the daemon and the workers need to know about a model, read without loading its weights.

The daemon sizes the KV pool and checks prompt lengths from a `ModelSpec`; the worker builds the network
from it. Two sources: a Hugging Face directory (config.json, plus generation_config.json for extra eos ids)
or a GGUF file (its metadata; the tensor index is read to detect q/k/v biases, the tensor data is not).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "linear" (positions divided by factor) or "llama3" (Llama 3.1's
    wavelength-dependent blend between scaled and unscaled frequencies)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ValueError(f"unsupported rope scaling {self.kind!r} (supported: linear, llama3)")
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rope_scaling: RopeScaling | None
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: q/k/v projections carry a bias
    o_bias: bool  # Llama with attention_bias=True: the output projection has one too
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, in fp32 bytes (halve for bf16/fp16)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 4


def load_model_spec(path: str | Path) -> ModelSpec:
    """Read a model's spec from a Hugging Face directory or a GGUF file (or a directory holding exactly
    one .gguf and no config.json). Raises ValueError for anything else or an unsupported architecture."""
    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        return spec_from_hf_config(_read_json(p / "config.json"), p.name, _read_generation_eos(p))
    gguf_path = resolve_gguf_file(p)
    return _spec_from_gguf(gguf_path)


def resolve_gguf_file(path: Path) -> Path:
    """`path` itself if it is a .gguf file, or the single .gguf inside a directory."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
        raise ValueError(
            f"{path}: expected config.json or exactly one .gguf file, found {len(found)} .gguf files"
        )
    raise ValueError(f"{path}: not a model directory or a .gguf file")


def spec_from_hf_config(config: Mapping[str, Any], name: str, extra_eos: tuple[int, ...] = ()) -> ModelSpec:
    """Build a spec from a parsed config.json (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
    `rope_parameters`)."""
    model_type = str(config.get("model_type", ""))
    hidden = int(config["hidden_size"])
    num_heads = int(config["num_attention_heads"])
    rope = dict(config.get("rope_parameters") or {})
    legacy_scaling = config.get("rope_scaling") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling_src = rope if rope.get("rope_type", "default") != "default" else legacy_scaling
    attention_bias = bool(config.get("attention_bias", False))
    eos = _as_ids(config.get("eos_token_id"))
    bos = config.get("bos_token_id")
    return ModelSpec(
        name=str(config.get("_name_or_path") or name),
        architecture=model_type,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=int(config.get("head_dim") or hidden // num_heads),
        intermediate_size=int(config["intermediate_size"]),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(scaling_src),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(dict.fromkeys(eos + extra_eos)),
    )


def _rope_scaling(src: Mapping[str, Any]) -> RopeScaling | None:
    kind = src.get("rope_type") or src.get("type")
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling("linear", float(src["factor"]))
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(src["factor"]),
            float(src.get("low_freq_factor", 1.0)),
            float(src.get("high_freq_factor", 4.0)),
            int(src.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(f"unsupported rope scaling {kind!r} (supported: linear, llama3)")


_QUANT_SUFFIX = re.compile(r"[._-](?:I?Q\d\w*|[BF]F?16|F32)$", re.IGNORECASE)


def gguf_model_name(path: Path) -> str:
    """The served model id of a GGUF file: its file name without the quantization tag
    ("SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"). The metadata's general.name is often a
    training-run label ("Smollm2 135M 8k Lc100K Mix1 Ep2"), which clients would have to copy verbatim."""
    return _QUANT_SUFFIX.sub("", path.name.removesuffix(".gguf")) or path.stem


def _spec_from_gguf(path: Path) -> ModelSpec:
    from shared.gguf_file import GGUFFile

    with GGUFFile(path) as gguf_file:
        meta = GGUFMetadata(gguf_file.fields)
        tensor_names = {t.name for t in gguf_file.tensors}
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}")
    hidden = int(meta.get(f"{arch}.embedding_length"))
    num_heads = int(meta.get(f"{arch}.attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(meta.get("tokenizer.ggml.tokens"))
    scaling = None
    if meta.get(f"{arch}.rope.scaling.type", None) == "linear":
        scaling = RopeScaling("linear", float(meta.get(f"{arch}.rope.scaling.factor")))
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    eot = meta.get("tokenizer.ggml.eot_token_id", None)
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    return ModelSpec(
        name=gguf_model_name(path),
        architecture=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(meta.get(f"{arch}.block_count")),
        num_heads=num_heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // num_heads)),
        intermediate_size=int(meta.get(f"{arch}.feed_forward_length")),
        rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 2048)),
        # llama.cpp omits output.weight when the head is tied to the embedding
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=tuple(dict.fromkeys(int(t) for t in (eos, eot) if t is not None)),
    )


class GGUFMetadata:
    """Access to a GGUF file's key/value fields with clear errors for missing keys."""

    _MISSING = object()

    def __init__(self, fields: Mapping[str, Any]) -> None:
        self._fields = fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """The field's value (str, number, bool or list). Raises ValueError if absent and no default."""
        if key in self._fields:
            return self._fields[key]
        if default is GGUFMetadata._MISSING:
            raise ValueError(f"GGUF metadata lacks {key!r}")
        return default


def _read_json(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _read_generation_eos(model_dir: Path) -> tuple[int, ...]:
    gen = model_dir / "generation_config.json"
    if not gen.is_file():
        return ()
    return _as_ids(_read_json(gen).get("eos_token_id"))


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
