"""A user's prompt embeddings from a `prlhf export` folder, for engines that take `inputs_embeds`.

Standalone on purpose: it imports torch, safetensors and transformers only (never prlhf), and `prlhf export` copies
this file into every export, so a GPU box with just an inference engine installed can use it:

    tokens:      [BOS] [u_1 ... u_T] [prompt ...]          (no BOS slot for a tokenizer that adds none)
    embeddings:  (L + T_u, d): the merged model's input embeddings of the prompt, the user's T_u rows after BOS

    from prompt_embeds import PromptEmbedder          # OUT/prompt_embeds.py
    embedder = PromptEmbedder("OUT")
    emb = embedder("user_01", "Summarize: ...")       # unknown user ids get the generic user (row 0)

    # vLLM (offline; `vllm serve OUT/model --enable-prompt-embeds` takes them base64-encoded on /v1/completions)
    from vllm import LLM, SamplingParams
    llm = LLM(model="OUT/model", enable_prompt_embeds=True)
    out = llm.generate({"prompt_embeds": emb}, SamplingParams(temperature=0, max_tokens=64))

    # SGLang
    engine.generate(input_embeds=[emb.tolist()], sampling_params={"temperature": 0, "max_new_tokens": 64})

UNTESTED with vLLM and SGLang: prlhf's tests had no GPU and run these embeddings only through transformers
(`AutoModelForCausalLM.from_pretrained("OUT/model").generate(inputs_embeds=emb[None])`), where they reproduce prlhf's
own log-probs and greedy tokens. An engine that serves in another dtype than the export's may need
`PromptEmbedder("OUT", dtype=torch.bfloat16)`. The rows are what the Hugging Face model's input embedding layer
returns (its own scale included, e.g. Gemma 3's sqrt(d)), which is what vLLM's prompt-embeds example feeds too.

Prompts are tokenized as `prlhf generate` does (prlhf.data.tokenize.encode_prompt): no special tokens from the
tokenizer, BOS put first when the tokenizer uses one, and a user_text (explicit preferences) before the prompt.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

EXPORT_FORMAT = "prlhf-export/1"
USERS_FILE = "users.safetensors"  # one tensor `embeddings`: (N+1, T_u, d), row 0 = the generic user
USERS_TENSOR = "embeddings"


class PromptEmbedder:
    """PromptEmbedder(export_dir)(user_id, prompt) -> (L + T_u, d) prompt embeddings of that user."""

    def __init__(self, export_dir: str | os.PathLike, dtype: torch.dtype | None = None, device: str = "cpu"):
        root = Path(export_dir)
        meta = json.loads((root / "export.json").read_text())
        if meta.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{root}: not a prlhf export (export.json format {meta.get('format')!r}, expected "
                             f"{EXPORT_FORMAT!r})")
        self.meta = meta
        self.prefix_len = int(meta["prefix_len"])  # 1: BOS comes first and the user's tokens go after it
        self.num_user_tokens = int(meta["num_user_tokens"])
        self.tokenizer = AutoTokenizer.from_pretrained(root / "model")
        source = meta["input_embeddings"]  # where the merged model's (V, d) input embedding matrix is stored
        with safe_open(str(root / source["file"]), "pt", device=device) as f:
            self.weight = f.get_tensor(source["tensor"])  # (V, d)
        if dtype is not None:
            self.weight = self.weight.to(dtype)
        # the embedding layer's multiplier on lookup (Gemma 3: sqrt(d)), applied in the weight's dtype as it does
        scale = source.get("scale")
        self.scale = None if scale is None else torch.tensor(scale, dtype=self.weight.dtype, device=device)
        self._users = safe_open(str(root / USERS_FILE), "pt", device=device)  # rows read on demand, not all at once
        registry = json.loads((root / "users.json").read_text())
        self.generic_index = int(registry.get("generic_index", 0))
        self.index = {uid: int(i) for uid, i in registry["users"].items()}

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def user_index(self, user_id: str) -> int:
        """The user's row; ids not seen in training get the generic user's."""
        return self.index.get(user_id, self.generic_index)

    def ids(self, prompt: str, user_text: str | None = None) -> list[int]:
        """Token ids of the prompt as prlhf generates from it: [BOS] + prompt (user_text first, when given)."""
        text = prompt if not user_text else f"{user_text}\n\n{prompt}"
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        bos = self.tokenizer.bos_token_id
        if self.prefix_len and ids[:1] != [bos]:
            ids = [bos] + ids
        return ids

    def embed_tokens(self, ids: list[int]) -> torch.Tensor:
        """(L,) ids -> (L, d) rows of the input embedding matrix (scaled as the model's embedding layer scales)."""
        rows = self.weight[torch.tensor(ids, dtype=torch.long, device=self.weight.device)]
        return rows if self.scale is None else rows * self.scale

    def user_tokens(self, index: int) -> torch.Tensor:
        """(T_u, d) soft tokens of the user at row `index`, in the embeddings' dtype (as prlhf casts them)."""
        return self._users.get_slice(USERS_TENSOR)[index].to(self.weight.dtype)

    def embed_ids(self, ids: list[int], index: int) -> torch.Tensor:
        """(L,) ids and a user row -> (L + T_u, d): the user's tokens inserted after the prefix (BOS)."""
        tokens, b = self.embed_tokens(ids), self.prefix_len
        return torch.cat([tokens[:b], self.user_tokens(index), tokens[b:]], dim=0)

    def __call__(self, user_id: str, prompt: str, user_text: str | None = None) -> torch.Tensor:
        return self.embed_ids(self.ids(prompt, user_text), self.user_index(user_id))

    def chat(self, user_id: str, messages: list[dict], user_text: str | None = None) -> torch.Tensor:
        """A conversation rendered with the tokenizer's chat template (plus the generation prompt), then embedded
        as a plain prompt, as prlhf renders conversational data."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the exported tokenizer has no chat template; pass the prompt as text")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self(user_id, text, user_text)
