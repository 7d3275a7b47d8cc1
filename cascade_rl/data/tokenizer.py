"""A byte-level BPE tokenizer trained locally (no model hub) with Qwen-style ChatML special tokens.

Layout, as in Qwen2/Qwen3 and InternVL3.5:
- ``<|endoftext|>`` pads; ``<|im_end|>`` ends an assistant turn and is the EOS token, so a response trained as
  ``text + eos`` matches what the chat template renders (``<|im_start|>assistant\\n…<|im_end|>``).
- InternVL image tokens: a ``{"type": "image"}`` message part renders as ``<IMG_CONTEXT>\\n``; InternVL's
  processor expands each into ``<img>`` + ``<IMG_CONTEXT>`` x image_seq_length + ``</img>``.
- Digits are split one per token (``pre_tokenizers.Digits(individual_digits=True)``): arithmetic on digits is
  learnable by a tiny model, arithmetic on merged multi-digit tokens much less so.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EOS_TOKEN = IM_END
# Named tokens become tokenizer attributes (``tokenizer.context_image_token``), as InternVL's processor expects.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
    "image_token": "<image>",
}
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END, *IMAGE_TOKENS.values()]

# ChatML (Qwen2.5 style, without a default system prompt). String content is emitted as is; list content
# (``[{"type": "image"}, {"type": "text", "text": ...}]``) puts one image placeholder per image part.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] in ['image', 'image_url', 'image_pil'] %}{{- '<IMG_CONTEXT>\\n' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(out_dir: str | Path, corpus: Iterable[str], vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE on ``corpus``, save it as a ``PreTrainedTokenizerFast`` folder; return the folder.

    ``vocab_size`` is an upper bound: a small, repetitive corpus stops merging earlier. The result loads with
    ``AutoTokenizer.from_pretrained(out_dir)`` and has the ChatML chat template above.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                         f"{256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=None, unk_token=None,
        extra_special_tokens=dict(IMAGE_TOKENS), chat_template=CHAT_TEMPLATE,
        padding_side="left", model_max_length=4096, clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out)
    return out
