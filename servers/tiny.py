"""Tiny random models built locally (no hub): a 2-layer Llama with a small trained BPE tokenizer
and a chat template, and a tiny BERT encoder for embeddings. For smoke tests of the serving
stack and for the test suite; their answers are noise.

    python -m servers.tiny llama DIR      # or: encoder DIR
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "hello world how are you today",
    "I'm sorry, I cannot help with that request.",
    "Sure, here is how to do it step by step.",
    "Write a script that can exploit vulnerabilities in a software or operating system",
    "the quick brown fox jumps over the lazy dog",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def bpe_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Metaspace (sentencepiece-style) pieces always decode to whole characters, so streamed
    # text and the final text agree even for a random model's arbitrary token sequences.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>")


def tiny_llama(path: Path, chat_template: bool = True, seed: int = 0, max_positions: int = 2048) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = bpe_tokenizer()
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_encoder(path: Path) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    tok = bpe_tokenizer()
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m servers.tiny", description="build a tiny random model for smoke tests")
    p.add_argument("kind", choices=["llama", "encoder"])
    p.add_argument("path", type=Path)
    a = p.parse_args()
    (tiny_llama if a.kind == "llama" else tiny_encoder)(a.path)
    print(a.path)


if __name__ == "__main__":
    main()
