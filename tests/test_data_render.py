"""Rendering records to text with (and without) a chat template, using an offline toy tokenizer."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prlhf.data.render import render_record
from prlhf.data.schema import PreferenceRecord

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
USER = {"role": "user", "content": "Say hi."}


def make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "say": 1, "hi": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(TEMPLATE)


def test_plain_record_passes_through(chat_tokenizer):
    record = PreferenceRecord("u1", "Say hi.", "Hi!", "No.")
    assert render_record(record, chat_tokenizer) == ("Say hi.", "Hi!", "No.")
    assert render_record(record, make_tokenizer(None)) == ("Say hi.", "Hi!", "No.")


def test_conversational_prompt_and_responses(chat_tokenizer):
    system = {"role": "system", "content": "Be kind."}
    record = PreferenceRecord("u1", [system, USER], [assistant("Hi!")], [assistant("No.")])
    prompt, chosen, rejected = render_record(record, chat_tokenizer)
    assert prompt == "<|system|>Be kind.<|end|>\n<|user|>Say hi.<|end|>\n<|assistant|>"
    assert (chosen, rejected) == ("Hi!<|end|>\n", "No.<|end|>\n")


def test_responses_fall_back_to_contents_when_template_is_not_prefix_stable():
    # The generation prompt differs from how the template renders an assistant turn.
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    record = PreferenceRecord("u1", [USER], [assistant("Hi!")], [assistant("No."), {"role": "user", "content": "?"}])
    prompt, chosen, rejected = render_record(record, make_tokenizer(template))
    assert prompt == "[user] Say hi.\nASSISTANT: "
    assert (chosen, rejected) == ("Hi!", "No.\n?")


def test_conversational_responses_are_template_suffix():
    # A template whose generation prompt is a prefix of the rendered assistant turn (the common case).
    template = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    record = PreferenceRecord("u1", [USER], [assistant("Hi!")], [assistant("No."), {"role": "user", "content": "?"}])
    prompt, chosen, rejected = render_record(record, make_tokenizer(template))
    assert prompt == "<|user|>\nSay hi.<|end|>\n<|assistant|>\n"
    assert chosen == "Hi!<|end|>\n"
    assert rejected == "No.<|end|>\n<|user|>\n?<|end|>\n"


def test_plain_responses_stay_plain_with_conversational_prompt(chat_tokenizer):
    record = PreferenceRecord("u1", [USER], "Hi!", [assistant("No.")])
    prompt, chosen, rejected = render_record(record, chat_tokenizer)
    assert prompt == "<|user|>Say hi.<|end|>\n<|assistant|>"
    assert chosen == "Hi!"
    assert rejected == "No.<|end|>\n"


def test_conversational_without_chat_template_is_a_one_line_error():
    record = PreferenceRecord("u1", [USER], [assistant("Hi!")], [assistant("No.")])
    with pytest.raises(ValueError, match="no chat template") as info:
        render_record(record, make_tokenizer(None))
    assert "\n" not in str(info.value)
