"""The tiny random model the tests build in code: a two-block Llama and a byte tokenizer.

Nothing is downloaded: the weights come from a seeded private generator and the tokenizer
maps each byte to a token, so the same bits appear on every machine. It has SmolLM2's
shape where it matters (tied embeddings, RMSNorm, grouped-query attention). Load it as
``load_model("tiny-llama")`` or ``"tiny-llama:SEED"``.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_NAME = "tiny-llama"
TINY_VOCAB_SIZE = 260  # 256 bytes + specials; see the byte-level tiny tokenizer
TINY_BOS, TINY_EOS, TINY_PAD, TINY_UNK = 256, 257, 258, 259
TINY_MAX_POSITIONS = 256


def build_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama (tied embeddings, like SmolLM2) built in code: same bits everywhere.

    Initialisation uses a private CPU generator seeded with ``seed``; this is model
    construction, never a perturbation direction.
    """
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=TINY_BOS,
        eos_token_id=TINY_EOS,
        pad_token_id=TINY_PAD,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ByteLevel expects)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer for the tiny model, built in code (no download, no merges).

    Token id ``b`` is byte ``b`` for 0..255; then ``<s>`` 256, ``</s>`` 257, ``<pad>`` 258,
    ``<unk>`` 259, matching :func:`build_tiny_llama`'s config. Nothing is added around an
    encoded text (no BOS), like SmolLM2's tokenizer, so a prompt's tokens are its bytes.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    specials = {"<s>": TINY_BOS, "</s>": TINY_EOS, "<pad>": TINY_PAD, "<unk>": TINY_UNK}
    vocab.update(specials)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TINY_MAX_POSITIONS,
    )
    tokenizer.padding_side = "left"
    return tokenizer
