"""A server inside the current Python process, on 127.0.0.1 (a notebook, a test, a simulation): uvicorn in a
thread, the engine in another; both stopped when the block ends.

    with serving(PersonalizedServer(load_run("runs/pdpo"), "pdpo")) as url:
        OpenAI(base_url=url + "/v1", api_key="unused").completions.create(...)
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(server, port: int | None = None, timeout: float = 30.0) -> Iterator[str]:
    """Start `server.app()` (a PersonalizedServer) and yield its base URL."""
    import uvicorn

    port = port or free_port()
    http = uvicorn.Server(uvicorn.Config(server.app(), host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="on"))
    thread = threading.Thread(target=http.run, name="prlhf-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not http.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        http.should_exit = True
        thread.join(timeout)
