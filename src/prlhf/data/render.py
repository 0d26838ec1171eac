"""Turn a record into plain (prompt, chosen, rejected) text, using the tokenizer's chat template for conversations."""

from __future__ import annotations

from typing import Any

from prlhf.data.schema import Messages, PreferenceRecord, PromptLike


def content_text(value: PromptLike) -> str:
    """Plain text as is; a conversation as its message contents joined by newlines (no template)."""
    if isinstance(value, str):
        return value
    return "\n".join(message["content"] for message in value)


def render_record(record: PreferenceRecord, tokenizer: Any) -> tuple[str, str, str]:
    """Return (prompt_text, chosen_text, rejected_text); plain-text fields pass through unchanged.

    A conversational prompt is rendered with the chat template (plus the generation prompt); conversational
    responses become what the template appends after that prompt.
    """
    if not isinstance(record.prompt, list):
        # The loader never produces message responses for a plain prompt; joining keeps hand-made records usable.
        return record.prompt, content_text(record.chosen), content_text(record.rejected)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template, so conversational data (prompts given as "
                         "lists of {role, content} messages) cannot be rendered; use plain-text data or a chat model")
    prompt_text = _apply(tokenizer, record.prompt, add_generation_prompt=True)
    return (prompt_text, _render_response(tokenizer, record.prompt, prompt_text, record.chosen),
            _render_response(tokenizer, record.prompt, prompt_text, record.rejected))


def _render_response(tokenizer: Any, prompt: Messages, prompt_text: str, response: PromptLike) -> str:
    """The response is what the template adds after the prompt (so it carries the template's end-of-turn text)."""
    if isinstance(response, str):
        return response
    full = _apply(tokenizer, prompt + response, add_generation_prompt=False)
    if full.startswith(prompt_text):
        return full[len(prompt_text):]
    # Some templates render earlier turns differently once more follow (e.g. they drop reasoning).
    return content_text(response)


def _apply(tokenizer: Any, messages: Messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
