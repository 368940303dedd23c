"""A small real tokenizer for the tiny test model, built offline and deterministically.

Tests must never download anything, yet the prompt and item-token code paths should run through a
genuine Hugging Face fast tokenizer (special tokens, padding, chat template, added tokens). A
byte-level BPE trained on a fixed built-in text gives exactly that: every string encodes (the
256-byte alphabet is always in the vocabulary), the vocabulary is small (fast tiny model) and the
same text trains the same merges in every process.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

TINY_VOCAB_SIZE = 768
BOS, EOS, PAD, UNK = "<|endoftext|>", "<|im_end|>", "<|pad|>", "<|unk|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [BOS, IM_START, EOS, PAD, UNK]

# Same shape as SmolLM2's template so tiny tests exercise the production prompt path.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TRAINING_TEXT = """
The user searched for a laser printer toner and clicked the second item. Next item: a stapler.
[rec] History: Stapler; Toner; Paper; Notebook; Pen. Next item:
[search] History: Coffee mug; Tea kettle. Query: stainless steel water bottle. Clicked item:
What is the capital of France? The capital of France is Paris. Berlin is the capital of Germany.
Personalized search and recommendation share one model. A query describes what the user wants now;
the history shows what the user liked before. Items are products, songs, notes, films and books.
Running shoes, hiking boots, wireless headphones, bluetooth speaker, phone case, laptop stand,
desk lamp, office chair, yoga mat, water bottle, coffee beans, green tea, chocolate cookies,
kitchen knife, frying pan, cutting board, baby stroller, dog food, cat toy, garden hose, rain jacket,
winter coat, summer dress, cotton shirt, denim jeans, leather wallet, travel backpack, sunglasses.
Red, blue, green, black, white, small, large, new, best, cheap, premium, classic, modern, portable.
One two three four five six seven eight nine ten hundred thousand first second third last.
I think that it is a good day to learn something new about the world and the people in it.
She said he would come back after the meeting, but they had already left for the station.
We can read, write, play, cook, travel, work and sleep; you should try this when there is time.
In the morning the city was quiet; by noon the streets were full of cars, bikes and buses.
Science, history, music, sports, health, beauty, home, garden, toys, games, electronics, fashion.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A model learns from data. Training updates weights with gradients; evaluation measures accuracy.
Hello! How are you? Thank you, I am fine. Please help me find a gift for my mother's birthday.
0 1 2 3 4 5 6 7 8 9 10 12 20 25 50 100 2024 3.5 $19.99 50% user_42 item_7 <item_3>
"""


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json() -> str:
    """Train once per process; callers get fresh objects built from this JSON."""
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the text makes frequency ties rarer; merges then depend only on the text.
    tok.train_from_iterator([_TRAINING_TEXT] * 3, trainer=trainer)
    return tok.to_str()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh, mutable tokenizer (left padding, pad token, chat template); identical every call."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
