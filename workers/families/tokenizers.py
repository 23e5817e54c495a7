"""Tokenizers built in memory for the offline presets: nothing is downloaded.

Each covers every text without unknown tokens (byte-level pieces), so a preset
tokenizes any prompt the way the real tokenizer's class does, only with more tokens.
They save and load as the real classes do (``save_pretrained`` / ``from_pretrained``).
``chat_token_count`` counts a prompt's tokens as Qwen-based pipelines send it (any tokenizer).
``mistral_tokenizer`` stands for FLUX.2 [dev]'s Mistral tokenizer (the released model wraps it in a
``PixtralProcessor``, which needs torchvision; the pipeline uses only its chat template).
"""

from __future__ import annotations

CLIP_MAX_TOKENS = 77


def clip_tokenizer(model_max_length: int = CLIP_MAX_TOKENS):
    """A ``CLIPTokenizer``: byte-level vocabulary, no merges (one token per UTF-8 byte, ``</w>`` at word ends)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocabulary = {symbol: index for index, symbol in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return CLIPTokenizer(vocab=vocabulary, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512):
    """A ``T5TokenizerFast`` over a Unigram model of byte pieces with byte fallback, as SentencePiece T5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # T5's special ids: pad 0, eos 1, unk 2; then the 256 byte pieces and printable ASCII with
    # and without the word-start marker, scored so whole characters win over byte fallback
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"<0x{byte:02X}>", -20.0) for byte in range(256)]
    printable = [chr(code) for code in range(33, 127)]
    pieces += [("\u2581" + character, -2.0) for character in printable] + [(character, -3.0) for character in printable]
    pieces.append(("\u2581", -4.0))
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="\u2581", prepend_scheme="always")])
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length, extra_ids=0,
    )


# Qwen3's chat template, reduced to what a text-to-image pipeline sends: one user message,
# the generation prompt, and the empty thinking block that enable_thinking=False would add
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def chat_token_count(tokenizer, text: str, *, enable_thinking: bool) -> int:
    """Tokens of ``text`` as a Qwen text encoder receives it: one user message in the chat template."""
    templated = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking,
    )
    return len(tokenizer(templated).input_ids)


def qwen_tokenizer(model_max_length: int = 32768):
    """A ``Qwen2Tokenizer``: byte-level vocabulary, no merges, Qwen's special tokens and chat template."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocabulary = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for token in special:
        vocabulary[token] = len(vocabulary)
    tokenizer = Qwen2Tokenizer(
        vocab=vocabulary, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


# Mistral Small 3's chat template, reduced to what FLUX.2 [dev] sends: a system message, then user
# messages, each content a list of {"type": "text"} parts; no generation prompt
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]{% else %}[INST]{{ text }}[/INST]{% endif %}"
    "{% endfor %}"
)
# Mistral's control tokens, with Pixtral's image tokens (a PixtralProcessor looks them up) and the
# instruction and system-prompt markers the chat template writes
MISTRAL_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[IMG]", "[IMG_BREAK]", "[IMG_END]")


def mistral_tokenizer(model_max_length: int = 131072):
    """A Mistral (tekken-like) byte-level BPE tokenizer: Mistral's special tokens, then the 256 byte
    symbols, no merges; the chat template FLUX.2 [dev]'s messages need."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocabulary = {token: index for index, token in enumerate(MISTRAL_SPECIAL_TOKENS)}
    for symbol in bytes_to_unicode().values():
        vocabulary[symbol] = len(vocabulary)
    backend = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIAL_TOKENS[4:])})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer
