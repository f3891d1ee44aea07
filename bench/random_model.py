"""Write a weightless Hugging Face model directory: config.json (the shape) + a word-level tokenizer.

Workers load it with `computeworker --model DIR --random-weights` (seeded random weights on the device);
the daemon reads only the config and the tokenizer, as for any model. The tokenizer has exactly
`vocab_size` entries ("<unk>", "<bos>", "<eos>", then "w3", "w4", ...), so every id a random model can
produce decodes to text and token-id prompts of any id below vocab_size are valid.

    python -m bench.random_model /tmp/llama3-8b-shape            # Llama-3-8B shape
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

EOS_ID = 2


@dataclass(frozen=True, slots=True)
class LlamaShape:
    vocab_size: int = 128256
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 32768
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.vocab_size < 4 or self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("vocab_size must be >= 4 and heads a multiple of KV heads")


LLAMA3_8B = LlamaShape()


def write_model_dir(path: str | Path, shape: LlamaShape = LLAMA3_8B, name: str = "random-llama") -> Path:
    """Create `path` (parents too) holding config.json, tokenizer.json and tokenizer_config.json.
    Overwrites those files if present. Returns the path."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": name,
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        **asdict(shape),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    vocab = {"<unk>": 0, "<bos>": 1, "<eos>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(3, shape.vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>"}))
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.random_model DIR", file=sys.stderr)
        sys.exit(2)
    print(write_model_dir(sys.argv[1]))
