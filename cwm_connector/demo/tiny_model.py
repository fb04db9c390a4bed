"""Build a tiny random-weight Llama-style model directory that vLLM can serve.

Nothing is downloaded: the byte-level BPE tokenizer is trained on the spot on a
deterministic synthetic corpus, and the weights come from ``torch.manual_seed``.
The result is a normal Hugging Face model directory (``config.json``,
``generation_config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json``) that
``vllm serve DIR`` / ``AutoTokenizer.from_pretrained(DIR)`` accept.

Command line::

    python -m cwm_connector.demo.tiny_model OUT_DIR [--layers N --hidden N --heads N
        --kv-heads N --intermediate N --vocab N --seed N]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["TinyModelSpec", "build_tiny_model", "main", "make_prompt"]

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0, 1, 2

# Simple chat template: BOS, one "role: content" line per message, then the
# assistant prefix.  Chat requests in vLLM do not add special tokens
# themselves, so the template provides the BOS token.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

# Fixed seed of the synthetic tokenizer corpus: the tokenizer depends only on
# the vocabulary size, never on ``TinyModelSpec.seed``, so rebuilding with a
# new seed changes the weights but keeps every prompt's token ids.
_CORPUS_SEED = 1234
_ONSETS = (
    "", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t",
    "v", "w", "z", "br", "ch", "cl", "dr", "gr", "pl", "qu", "sh", "st", "th",
    "tr",
)  # fmt: skip
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "x", "ck", "nd", "st")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of a tiny Llama model.

    ``hidden_size // num_heads`` is the attention head size; vLLM's CPU attention
    backend supports 32, 64, 80, 96, 112, 128, 160, 192, 224, 256 and 512
    (64 is used by the defaults and the benchmark shape).
    """

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    intermediate_size: int = 256
    vocab_size: int = 4096
    max_position_embeddings: int = 8192
    seed: int = 0
    dtype: str = "bfloat16"
    # Per-layer attention ("full_attention" | "sliding_attention"), as in Gemma/Qwen2/
    # Mistral-style configs; None: every layer full attention (issue 13's model families).
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None

    @property
    def head_size(self) -> int:
        """Attention head size (``hidden_size // num_heads``)."""
        return self.hidden_size // self.num_heads

    def validate(self) -> None:
        """Raise ``ValueError`` if the shape is inconsistent."""
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be divisible by num_kv_heads")
        if self.vocab_size < 512:
            raise ValueError("vocab_size must be at least 512 (256 bytes + merges)")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError("layer_types needs one entry per layer")
            if set(self.layer_types) - {"full_attention", "sliding_attention"}:
                raise ValueError("layer_types entries: full_attention or sliding_attention")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need sliding_window")


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _word(rng: random.Random) -> str:
    """Return one pronounceable lowercase pseudo-word."""
    syllables = rng.choice((1, 1, 2, 2, 2, 3, 3, 4))
    parts = []
    for _ in range(syllables):
        parts.append(rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS))
    return "".join(parts)


def _corpus(vocab_size: int) -> Iterator[str]:
    """Yield the deterministic synthetic training corpus (lines of words).

    Every word of a lexicon twice the vocabulary size once, plus a
    Zipf-distributed sample of it, so that BPE always reaches ``vocab_size``
    entries (about 1 s for 4096, 3 s for 32000 on two cores).
    """
    rng = random.Random(_CORPUS_SEED)
    lexicon_size = max(2 * vocab_size, 20_000)
    seen: set[str] = set()
    lexicon: list[str] = []
    while len(lexicon) < lexicon_size:
        word = _word(rng)
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    cum_weights: list[float] = []
    total = 0.0
    for rank in range(lexicon_size):
        total += 1.0 / (rank + 1)
        cum_weights.append(total)
    # Every lexicon word once, plus a Zipf-weighted sample.
    words = lexicon + rng.choices(lexicon, cum_weights=cum_weights, k=2 * lexicon_size)
    rng.shuffle(words)
    line = 32
    for start in range(0, len(words), line):
        yield " ".join(words[start : start + line])


def _train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``vocab_size`` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(vocab_size), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # add_special_tokens=True (the default, used by vLLM completions) prepends
    # BOS; add_special_tokens=False gives the raw text tokens.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_tokenizer(out_dir: Path, spec: TinyModelSpec) -> tuple[int, int, int]:
    """Train and save the tokenizer; return ``(bos_id, eos_id, vocab_len)``."""
    tokenizer = _train_tokenizer(spec.vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN}
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": spec.max_position_embeddings,
            "padding_side": "left",
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(out_dir / "special_tokens_map.json", special)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    return bos_id, eos_id, tokenizer.get_vocab_size(with_added_tokens=True)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


def _remove_stale_weights(out_dir: Path) -> None:
    """Delete weight files an earlier build may have left in ``out_dir``."""
    for pattern in ("model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin"):
        for path in out_dir.glob(pattern):
            path.unlink()


def _write_model(out_dir: Path, spec: TinyModelSpec, bos_id: int, eos_id: int) -> int:
    """Create random weights from ``spec.seed``, save them; return the parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        max_position_embeddings=spec.max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=True,
    )
    dtype = getattr(torch, spec.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model = model.to(dtype)
    model.config.dtype = spec.dtype
    model.eval()
    num_params = sum(p.numel() for p in model.parameters())
    _remove_stale_weights(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="1000GB")
    if spec.layer_types is not None:  # vLLM's Llama reads these from config.json
        path = out_dir / "config.json"
        doc = json.loads(path.read_text())
        doc.update(layer_types=list(spec.layer_types), sliding_window=spec.sliding_window)
        path.write_text(json.dumps(doc, indent=2) + "\n")
    return num_params


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write config.json, model.safetensors and tokenizer files into out_dir; return it.

    The weights are random, drawn from ``torch.manual_seed(spec.seed)``.

    Existing files in ``out_dir`` are overwritten in place, so rebuilding with
    another ``spec.seed`` changes the weights under the same path.  The
    tokenizer depends only on ``spec.vocab_size`` (and is identical for equal
    vocab sizes), so prompts keep their token ids across seeds.
    """
    spec.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id, vocab_len = _write_tokenizer(out, spec)
    if vocab_len > spec.vocab_size:
        raise RuntimeError(f"tokenizer has {vocab_len} entries > vocab_size {spec.vocab_size}")
    _write_model(out, spec, bos_id, eos_id)
    return out


def count_parameters(spec: TinyModelSpec) -> int:
    """Return the number of parameters of a model with ``spec`` (no weights built)."""
    h, kv = spec.hidden_size, spec.num_kv_heads * spec.head_size
    attn = h * h * 2 + h * kv * 2  # q, o, k, v
    mlp = 3 * h * spec.intermediate_size
    per_layer = attn + mlp + 2 * h  # two RMSNorms
    return spec.num_layers * per_layer + 2 * spec.vocab_size * h + h


# --------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------


def make_prompt(model_dir: str | Path, num_tokens: int, seed: int = 0) -> str:
    """Return deterministic text that encodes to exactly num_tokens tokens (no special tokens).

    The count holds for ``encode(text, add_special_tokens=False)``.  vLLM's
    /v1/completions tokenizes with special tokens, i.e. prepends BOS ``<s>``,
    so the server sees ``num_tokens + 1`` prompt tokens.  The text is a
    stream of pseudo-words drawn from ``seed`` (different seeds give different
    text; for one seed, longer prompts mostly extend shorter ones), possibly
    ending in a few ``.`` characters (one token each) to hit the count exactly.
    """
    from tokenizers import Tokenizer

    if num_tokens < 0:
        raise ValueError("num_tokens must be >= 0")
    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    rng = random.Random(f"cwm-prompt-{seed}")
    pieces: list[str] = []
    remaining = num_tokens
    misses = 0
    batch = 256
    while remaining > 0 and misses < 64:
        words = [_word(rng) for _ in range(batch)]
        texts = [(" " + w) if pieces or i else w for i, w in enumerate(words)]
        counts = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        for text, count in zip(texts, counts, strict=True):
            if remaining == 0 or misses >= 64:
                break
            if not pieces and text.startswith(" "):
                text = text[1:]
                count = len(tokenizer.encode(text, add_special_tokens=False).ids)
            if count <= remaining:
                pieces.append(text)
                remaining -= count
                misses = 0
            else:
                misses += 1
    # "." never appears in the training corpus, so no merge joins dots: each
    # one is a single byte-level token, and a run of them forms its own
    # pre-token after a word.
    text = "".join(pieces) + "." * remaining
    got = len(tokenizer.encode(text, add_special_tokens=False).ids)
    if got != num_tokens:  # pragma: no cover - guards the invariants above
        raise RuntimeError(f"make_prompt produced {got} tokens, wanted {num_tokens}")
    return text


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: build a model and print its directory and size."""
    defaults = TinyModelSpec()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument("--intermediate", type=int, default=defaults.intermediate_size)
    parser.add_argument("--vocab", type=int, default=defaults.vocab_size)
    parser.add_argument("--max-pos", type=int, default=defaults.max_position_embeddings)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default=defaults.dtype)
    args = parser.parse_args(argv)
    spec = TinyModelSpec(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        max_position_embeddings=args.max_pos,
        seed=args.seed,
        dtype=args.dtype,
    )
    start = time.perf_counter()
    out = build_tiny_model(args.out_dir, spec)
    elapsed = time.perf_counter() - start
    print(out)
    print(f"parameters: {count_parameters(spec):,} ({elapsed:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
