"""`prlhf export`: a policy run as a merged model plus its users' soft tokens, for engines that take prompt
embeddings (vLLM --enable-prompt-embeds, SGLang input_embeds).

`register(subparsers)` adds the command to the `prlhf` parser (prlhf.cli.main).
"""

from __future__ import annotations

import json

from prlhf.cli.common import set_threads


def cmd_export(args) -> int:
    from prlhf.serve.export import export_run

    set_threads(args.threads)
    out = export_run(args.run, args.out)
    meta = json.loads((out / "export.json").read_text())
    version = f" (version {meta['version']})" if meta["version"] else ""
    print(f"exported {args.run}{version}: {meta['num_users']} user(s) + the generic user, "
          f"{meta['num_user_tokens']} soft token(s) each -> {out} (model/, users.safetensors, users.json, "
          "export.json, prompt_embeds.py)")
    return 0


def register(subparsers) -> None:
    """Add `export` to the `prlhf` subcommands (the action returned by add_subparsers)."""
    e = subparsers.add_parser(
        "export", help="write a policy run as a merged model + users' soft tokens, for vLLM/SGLang prompt embeddings",
        description="Merge the run's LoRA adapters into its base and write DIR/model/ (a plain Hugging Face model "
                    "and tokenizer, safetensors), DIR/users.safetensors (every user's soft tokens, shape "
                    "(N+1, T_u, d), row 0 = the generic user that unknown ids get), DIR/users.json (the id "
                    "registry), DIR/export.json (what the prompt layout needs: prefix_len, num_user_tokens, ...) and "
                    "DIR/prompt_embeds.py, a standalone PromptEmbedder (torch, safetensors and transformers only) "
                    "that turns (user id, prompt) into prompt embeddings for vLLM (LLM(model=DIR/model, "
                    "enable_prompt_embeds=True)) or SGLang (input_embeds). DIR is written whole or not at all.")
    e.add_argument("--run", required=True, help="policy run directory written by `prlhf train` or `prlhf adapt "
                                                "--out` (or one of its versions/vN; not a reward-model run)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    e.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    e.set_defaults(func=cmd_export)
