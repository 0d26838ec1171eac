"""The personalized LM (P-RLHF.md §3): a user's T_u soft tokens go into `inputs_embeds` right after BOS.

    tokens:    [BOS] [u_1 ... u_T] [prompt ...] [response ...] [pad ...]
    attention:   1      1 ... 1        1            1            0
    labels:    -100   -100 ...       -100       response ids    -100

The reference policy is the same base with the LoRA adapters disabled and no user tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from prlhf.data.collate import IGNORE_INDEX
from prlhf.model.logprobs import sequence_logps
from prlhf.model.prompt_sharing import RowLayout, continuation_rows, left_align, prefix_rows
from prlhf.model.soft_prompt import SoftPromptModel
from prlhf.users.models import UserModel


class PersonalizedLM(SoftPromptModel):
    """pi(y | x, e_u): summed response log-probs with the user's soft tokens, pi_ref, and generation."""

    def __init__(self, lm: PreTrainedModel | PeftModel, user_model: UserModel, prefix_len: int,
                 share_prompts: bool = True, reference_lm: PreTrainedModel | None = None):
        super().__init__(lm, user_model, prefix_len)
        # pi_ref of an LM without adapters (a full fine-tune): a frozen copy made before training; a PEFT LM
        # needs none (its base with the adapters off is pi_ref)
        self.reference_lm = reference_lm.requires_grad_(False).eval() if reference_lm is not None else None
        # Score rows that share a prompt from one prefix forward (prompt_sharing.py). Off under activation
        # checkpointing, whose recomputation would append to the KV cache a second time.
        self.share_prompts = share_prompts

    def train(self, mode: bool = True) -> PersonalizedLM:
        super().train(mode)
        if self.reference_lm is not None:
            self.reference_lm.eval()  # frozen: no dropout in pi_ref, whatever the policy's mode
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                user_idx: torch.Tensor | None = None, layout: RowLayout | None = None) -> torch.Tensor:
        """Summed response log-probs (S,) for right-padded sequences (S, L), each with its user's tokens
        (user_idx (S,)) or none (user_idx None). `layout` describes the rows on the host (the training loop has
        it from the collator); without it, it is read from the tensors."""
        if layout is None:
            layout = RowLayout.from_tensors(input_ids, attention_mask, labels, user_idx, self.share_prompts)
        groups = layout.groups(input_ids.device) if self.share_prompts else None
        if groups is not None:
            return self._forward_shared_prompts(input_ids, attention_mask, labels, user_idx, groups)
        inserted = 0 if user_idx is None else self.user_model.num_tokens
        embeds, mask, labels = self.insert_user_tokens(input_ids, attention_mask, labels, user_idx)
        # Right padding: positions count real tokens only, so user tokens shift the prompt's positions by T_u.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        extra = {}
        first = layout.first_label()
        keep = self._logits_to_keep(labels.shape[1], None if first is None else first + inserted)
        if keep is not None:
            extra["logits_to_keep"] = keep
            labels = labels[:, -keep:]
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                         use_cache=False, **extra).logits
        return sequence_logps(logits, labels)

    def _forward_shared_prompts(self, input_ids, attention_mask, labels, user_idx, groups) -> torch.Tensor:
        """forward() with one pass per distinct prefix (U rows) and the S responses continued from its cache."""
        p_ids, p_mask = prefix_rows(input_ids, groups)  # (U, P)
        p_users = None if user_idx is None else user_idx[groups.first_row]
        p_embeds, p_mask, _ = self.insert_user_tokens(p_ids, p_mask, None, p_users)
        p_embeds, p_mask = left_align(p_embeds, p_mask)  # every prefix ends at the last column
        p_positions = (p_mask.cumsum(-1) - 1).clamp(min=0)
        extra = {"logits_to_keep": 1} if self.supports_logits_to_keep() else {}
        out = self.lm(inputs_embeds=p_embeds, attention_mask=p_mask, position_ids=p_positions, use_cache=True,
                      **extra)
        cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5 | 4
        if cache is None or not hasattr(cache, "reorder_cache"):  # a model without a reorderable KV cache
            self.share_prompts = False
            return self.forward(input_ids, attention_mask, labels, user_idx)
        first_logits = out.logits[:, -1][groups.prefix_of]  # (S, V): predicts each row's first response token
        cache.reorder_cache(groups.prefix_of)  # (U, ...) -> (S, ...), a gather: gradients reach the prefix
        c_ids, c_mask, c_labels = continuation_rows(input_ids, attention_mask, labels, groups)  # (S, R)
        mask = torch.cat([p_mask[groups.prefix_of], c_mask], dim=1)  # (S, P' + R)
        positions = p_mask.sum(1)[groups.prefix_of, None] + torch.arange(c_ids.shape[1], device=c_ids.device)
        c_logits = self.lm(inputs_embeds=self.lm.get_input_embeddings()(c_ids), attention_mask=mask,
                           position_ids=positions, use_cache=True, **{self.cache_kwarg(): cache}).logits
        logits = torch.cat([first_logits[:, None], c_logits], dim=1)  # (S, 1 + R, V)
        return sequence_logps(logits, torch.cat([torch.full_like(c_labels[:, :1], IGNORE_INDEX), c_labels], 1))

    def _logits_to_keep(self, width: int, first_label: int | None) -> int | None:
        """How many final positions of rows `width` wide need logits: from the one before the earliest response
        token (`first_label`, after the user tokens) on. The output head and log-softmax over the vocabulary then
        skip most prompt positions (about a fifth of a small model's compute on short-answer data). None when
        the model's forward has no `logits_to_keep` or no row has labels."""
        if not self.supports_logits_to_keep() or first_label is None:
            return None
        return width - max(first_label - 1, 0)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """pi_ref: adapters off, or the frozen `reference_lm` of an LM without adapters."""
        if isinstance(self.lm, PeftModel):
            with self.lm.disable_adapter():
                yield
            return
        if self.reference_lm is None:  # else pi_ref would silently be the policy itself
            raise TypeError("the LM has no adapters, so its reference policy needs reference_lm= (a frozen copy "
                            "made before training, e.g. copy.deepcopy(lm)), or add LoRA first "
                            "(prlhf.model.loading.add_lora)")
        policy = self.lm
        self.lm = self.reference_lm
        try:
            yield
        finally:
            self.lm = policy

    @torch.no_grad()
    def reference_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
        with self.reference():
            return self.forward(input_ids, attention_mask, labels, user_idx=None)

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], user_idx: torch.Tensor | None, pad_token_id: int,
                 eos_token_id: int, max_new_tokens: int = 64, **generate_kwargs) -> list[list[int]]:
        """Generate for several users in one batch through `generate` (KV cache on unless told otherwise).

        Prompts are left-padded after the user tokens are inserted, so every row ends at the same position.
        Returns the new token ids of each row, cut after the first EOS.
        """
        embeds, mask = self.prompt_embeddings(prompt_ids, user_idx, pad_token_id)
        if generate_kwargs.pop("use_cache", True) is False:
            # transformers always caches when generating from inputs_embeds, so the uncached path is ours
            out = self._greedy_without_cache(embeds, mask, eos_token_id, pad_token_id, max_new_tokens,
                                             generate_kwargs.pop("min_new_tokens", 0), **generate_kwargs)
        else:
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   pad_token_id=pad_token_id, eos_token_id=eos_token_id, **generate_kwargs)
        results = []
        for row in out.tolist():
            results.append(row[:row.index(eos_token_id) + 1] if eos_token_id in row else row)
        return results

    def prompt_embeddings(self, prompt_ids: Sequence[Sequence[int]], user_idx: torch.Tensor | None, pad_token_id: int,
                          user_model: UserModel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (each [BOS] + prompt ids) -> (B, L, d) embeddings with the users' soft tokens after BOS and the
        (B, L) mask, left-padded so that every row ends at the last column (what generation continues from).
        `user_model` replaces the model's own (see insert_user_tokens)."""
        device = self.lm.get_input_embeddings().weight.device
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompt_ids):  # right-pad first; rows are re-aligned to the left below
            ids[row, :len(p)] = torch.tensor(list(p), device=device)
            mask[row, :len(p)] = 1
        idx = None if user_idx is None else user_idx.to(device)
        embeds, mask, _ = self.insert_user_tokens(ids, mask, None, idx, user_model=user_model)
        return left_align(embeds, mask)

    def _greedy_without_cache(self, embeds: torch.Tensor, mask: torch.Tensor, eos_token_id: int, pad_token_id: int,
                              max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False) -> torch.Tensor:
        """Greedy decoding that re-runs the whole sequence at every step (what the authors' code did, with the
        cache off): quadratic, kept as the reference that cached generation is tested and timed against."""
        if do_sample:
            raise ValueError("use_cache=False supports greedy decoding only")
        embed = self.lm.get_input_embeddings()
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        new_tokens = []
        for step in range(max_new_tokens):
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                             use_cache=False).logits[:, -1]  # (B, V)
            if step < min_new_tokens:
                logits[:, eos_token_id] = float("-inf")
            token = logits.argmax(-1).masked_fill(done, pad_token_id)  # (B,)
            new_tokens.append(token)
            done |= token == eos_token_id
            if done.all():
                break
            embeds = torch.cat([embeds, embed(token)[:, None].to(embeds.dtype)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        return torch.stack(new_tokens, dim=1)  # (B, new)
