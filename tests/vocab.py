"""Real vocabularies for the tests, built on the spot with no hub: Qwen's byte-level BPE from its
published ranks, and a Llama-style SentencePiece model with a dummy prefix, trained here.

- Qwen: `qwen.tiktoken` (151,643 ranks), shipped in the `dashscope` wheel (a dev dependency),
  turned into a fast tokenizer by transformers' TikTokenConverter with Qwen's split pattern, and
  its three special tokens at Qwen's ids (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|>
  151645), with Qwen's ChatML template.
- SentencePiece: a BPE model trained by `sentencepiece` on the demo's seed answers, with
  byte fallback and the dummy prefix on (`add_dummy_prefix`, as Llama-2's, Mistral's and some of
  Yi's), loaded as transformers' LlamaTokenizer (legacy=False: the prefix only at the start).
"""

from __future__ import annotations

import importlib.util
import io
import json
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QWEN_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-2's: the reply follows `[/INST]` after a space, which the model writes as part of its reply.
LLAMA2 = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def qwen_ranks() -> Path:
    spec = importlib.util.find_spec("dashscope")  # found, not imported: only its data file is read
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dashscope wheel (a dev dependency) ships Qwen's BPE ranks; install the dev extra")
    return Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"


@lru_cache(maxsize=1)
def _qwen_json() -> str:
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tk = TikTokenConverter(vocab_file=str(qwen_ranks()), pattern=QWEN_PATTERN).converted()
    tk.add_special_tokens(QWEN_SPECIALS)
    return tk.to_str()


def qwen():
    """Qwen's real tokenizer (151,646 tokens), ChatML template, <|im_end|> as EOS."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_qwen_json()), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    assert tok.convert_tokens_to_ids(QWEN_SPECIALS) == [151643, 151644, 151645]
    return tok


@lru_cache(maxsize=1)
def _sentencepiece_vocab() -> dict[str, int]:
    import sentencepiece as spm

    seeds = [json.loads(line) for line in (REPO / "demo/seed/coig_cqia_seed.jsonl").read_text("utf-8").splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s["output"] for s in seeds]),
        model_writer=model,
        vocab_size=2400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}


def sentencepiece(template: str = CHATML):
    """A Llama-style tokenizer with a dummy prefix; ChatML's <|im_start|>/<|im_end|> added when the
    template is ChatML."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = _sentencepiece_vocab()
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        legacy=False,
        add_prefix_space=True,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    if template == CHATML:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


def tiny_model(tok, path: Path, kind: str = "qwen2", seed: int = 0) -> Path:
    """A 2-layer model with random weights on `tok`'s vocabulary, saved with it. The weights are
    drawn wide (initializer_range 0.5) so next-token distributions are far from uniform: reading
    the wrong token then gives a visibly different log-probability."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        initializer_range=0.5,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if kind == "qwen2":
        cfg = Qwen2Config(vocab_size=151936, **common)  # Qwen2's own size, padded past the tokenizer's 151,646
    else:
        cfg = LlamaConfig(vocab_size=len(tok), **common)
    model = AutoModelForCausalLM.from_config(cfg).float()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
