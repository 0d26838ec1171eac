"""The one record schema every loader produces, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

# A prompt is plain text or a conversation (list of {"role", "content"} messages, rendered later with the
# tokenizer's chat template). Responses are plain text after loading (conversational responses are
# rendered to text when the tokenizer is known, see prlhf.data.tokenize).
Messages = list[dict[str, str]]
PromptLike = Union[str, Messages]
ResponseLike = Union[str, Messages]


class DataError(ValueError):
    """Bad input data. The message is one line naming the file, the line/row, the field and what was expected."""

    def __init__(self, source: str, message: str, location: str | None = None, field: str | None = None):
        # location: "line 3" (text formats, 1-based file lines) or "row 3" (Parquet / datasets, 1-based rows)
        self.source, self.location, self.field, self.detail = source, location, field, message
        parts = [source] + ([location] if location else []) + ([f"field '{field}'"] if field else [])
        super().__init__(", ".join(parts) + f": {message}")


@dataclass(frozen=True)
class PreferenceRecord:
    """One comparison: `user_id` judged `chosen` better than `rejected` as an answer to `prompt`."""

    user_id: str
    prompt: PromptLike
    chosen: ResponseLike
    rejected: ResponseLike
    user_text: str | None = None
