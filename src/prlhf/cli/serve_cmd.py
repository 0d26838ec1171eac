"""`prlhf serve`: the OpenAI-compatible server over a run (prlhf.serve.app).

`register(subparsers)` adds the command to the `prlhf` parser (prlhf.cli.main).
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from prlhf.cli.common import set_threads
from prlhf.cli.store_cmds import open_store
from prlhf.config import ONBOARD_STEPS, ConfigError

DESCRIPTION = """Serve a policy run over OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions (stream, n,
max_tokens, temperature, top_p, seed, stop), /health and /metrics. A request's `user` field picks that user's soft
tokens; an id the run does not hold gets the generic user, and the answer's `prlhf.user_known` says so. Concurrent
requests of different users are decoded in one batch. The user table is reloaded when the run gets a new version
(`prlhf users import|delete`); requests in flight finish on the version they started with."""


def read_api_keys(path: str) -> list[str]:
    """One key per line (blank lines and #-comments skipped); the keys themselves are never printed."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the API key file ({exc.__class__.__name__})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"{path}: the API key file holds no key")
    return keys


def cmd_invite(args) -> int:
    """`prlhf serve invite USER --db URL`: a personal token (and the page's link) for USER."""
    if len(args.invite) != 2 or args.invite[0] != "invite":
        raise ConfigError("serve: the only action is `prlhf serve invite USER --db URL`")
    if not args.db:
        raise ConfigError("serve invite: --db URL is required (the store the server uses)")
    store = open_store(args.db, "serve invite")
    try:
        token = store.invite(args.invite[1])
    finally:
        store.close()
    print(f"token for {args.invite[1]!r} (shown once): {token}\npage: http://{args.host}:{args.port}/ui?token={token}")
    return 0


def cmd_serve(args) -> int:
    if args.invite:
        return cmd_invite(args)
    if not args.run:
        raise ConfigError("serve: --run RUN is required")
    try:
        import uvicorn

        from prlhf.serve.app import Limits, PersonalizedServer
    except ImportError as exc:
        raise ConfigError(f"serve: {exc.name} is not installed: pip install 'prlhf[serve]'") from None
    from prlhf.evaluate.scoring import require_reward_run
    from prlhf.runs.directory import RunError, load_run

    set_threads(args.threads)
    for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_tokens_cap", "port", "onboard_after",
                 "onboard_steps"):
        if getattr(args, name) is not None and getattr(args, name) < (0 if name in ("port", "onboard_after") else 1):
            raise ConfigError(f"serve: --{name.replace('_', '-')} must be positive")
    keys = read_api_keys(args.api_key_file) if args.api_key_file else []
    if args.onboard_pairs and not args.db:
        raise ConfigError("serve: --onboard-pairs needs --db URL (a user's answers are stored as comparisons)")
    from prlhf.train.onboard_pairs import read_onboard_pairs

    onboard_pairs = read_onboard_pairs(args.onboard_pairs) if args.onboard_pairs else ()  # before the model loads
    run = load_run(args.run, device=args.device)
    if getattr(run.model, "is_reward_model", False):
        raise RunError(f"{args.run}: a reward-model run does not generate; pass it as --reward-run")
    reward = require_reward_run(load_run(args.reward_run, device=args.device)) if args.reward_run else None
    limits = Limits(max_prompt_tokens=args.max_prompt_tokens or run.config.max_prompt_length,
                    max_tokens=args.max_tokens_cap, request_timeout=args.request_timeout)
    store = open_store(args.db, "serve") if args.db else None
    server = PersonalizedServer(run, args.model_name or Path(args.run).resolve().name, limits, reward=reward,
                                api_keys=keys, max_batch=args.max_batch_size, batch_wait=args.batch_wait_ms / 1000,
                                max_queue=args.max_queue, reload_interval=args.reload_interval or None,
                                prefix_cache_bytes=int(args.prefix_cache_mb * 2 ** 20), store=store,
                                onboard_after=args.onboard_after, onboard_steps=args.onboard_steps,
                                onboard_pairs=onboard_pairs)
    logging.getLogger("prlhf").setLevel(logging.INFO)
    http = uvicorn.Server(uvicorn.Config(server.app(engine_thread=False), host=args.host, port=args.port,
                                         log_level=args.log_level, access_log=args.access_log))
    # HTTP in a thread, decoding on this one (torch's kernels are slower from a secondary thread: engine.py)
    thread = threading.Thread(target=http.run, name="prlhf-http", daemon=True)

    def shut_down(signum, _frame):
        http.force_exit = http.should_exit  # a second signal: do not wait for open connections
        http.should_exit = True  # uvicorn finishes the requests in flight, then stops the engine (lifespan)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, shut_down)
    thread.start()
    print(f"prlhf: serving {args.run} as {server.model_name!r} on http://{args.host}:{args.port}/v1"
          + (" (API key required)" if keys else ""), flush=True)
    server.engine.run(keep_going=thread.is_alive)
    thread.join()
    if store is not None:
        store.close()
    if not http.started:
        raise ConfigError(f"serve: could not listen on {args.host}:{args.port} (in use, or not an address of "
                          "this machine)")
    return 0


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve a run over OpenAI's API, each request with its user's soft tokens",
                       description=DESCRIPTION)
    s.add_argument("invite", nargs="*", metavar="invite USER",
                   help="`prlhf serve invite USER --db URL` prints a personal token and page link for USER instead "
                        "of serving")
    s.add_argument("--run", help="policy run directory written by `prlhf train` (required to serve)")
    s.add_argument("--reward-run", metavar="RM_RUN",
                   help="a reward-model run (--objective rm): requests may then ask for best_of samples reranked "
                        "by their user's reward")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model-name", help="the model id clients send (default: the run folder's name)")
    s.add_argument("--api-key-file", metavar="FILE",
                   help="require Authorization: Bearer KEY, one accepted key per line (/health stays open)")
    s.add_argument("--max-batch-size", type=int, default=32, help="rows decoded together at most (default 32)")
    s.add_argument("--batch-wait-ms", type=float, default=2.0,
                   help="how long an idle server waits for more requests to start a batch with (default 2 ms; "
                        "later arrivals join the running batch at a step boundary)")
    s.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting at most; more get 429 (default 256)")
    s.add_argument("--max-prompt-tokens", type=int,
                   help="longer prompts get 400 (default: the run's max_prompt_length)")
    s.add_argument("--max-tokens-cap", type=int, default=512, help="the largest max_tokens a request may ask for")
    s.add_argument("--request-timeout", type=float, default=60.0,
                   help="seconds a request may take from arrival to its last token; then 503 (default 60)")
    s.add_argument("--reload-interval", type=float, default=2.0,
                   help="seconds between checks for a new version of the run's user table (0: never)")
    s.add_argument("--db", metavar="URL",
                   help="store users' comparisons here (sqlite:///PATH, or postgresql://... for several server "
                        "processes): POST/GET /v1/feedback, the page /ui, and completion requests with \"compare\": "
                        "true get a pair to compare")
    s.add_argument("--onboard-after", type=int, default=10, metavar="K",
                   help="with --db: fit a new user's row (LM frozen, as prlhf adapt) once they have K comparisons "
                        "with a winner, and a known user's again after every K more; each fit is committed as a new "
                        "version and served (0: never; default 10)")
    s.add_argument("--onboard-steps", type=int, default=ONBOARD_STEPS, metavar="N",
                   help=f"optimizer steps of each such fit (default {ONBOARD_STEPS}, half of prlhf adapt's: the "
                        "user waits for it; docs/serve.md has the accuracy it costs)")
    s.add_argument("--onboard-pairs", metavar="FILE",
                   help="with --db: show each user these pairs first (JSONL of prompt, response_a, response_b; "
                        "`prlhf users onboard-pairs` picks them from the training data): a newcomer's choices between "
                        "two samples of the generic model teach their row little (docs/serve.md)")
    s.add_argument("--prefix-cache-mb", type=float, default=256.0,
                   help="memory for the KV of recent users' [BOS] + soft tokens, so their prefill covers the prompt "
                        "only (0: off; default 256)")
    s.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.add_argument("--access-log", action="store_true", help="log every request line (never its headers)")
    s.set_defaults(func=cmd_serve)
