"""A throwaway PostgreSQL server for the tests (Debian's postgresql package, which `make test` installs): its own
data folder and port on 127.0.0.1, stopped and removed afterwards. As root it runs as the `postgres` user (the
server refuses root)."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prlhf.serve.background import free_port


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yield the URL of a fresh PostgreSQL server (user prlhf, database postgres)."""
    import psycopg

    bindir = postgres_bin()
    work = Path(tempfile.mkdtemp(prefix="prlhf-pg-", dir="/tmp"))  # a folder the postgres user can reach
    # the server refuses root: as root, run it as the postgres user (subprocess switches user itself; runuser
    # lives in /usr/sbin, which a minimal PATH lacks)
    run_as = {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
    if run_as:
        shutil.chown(work, "postgres", "postgres")
    data, port = work / "data", free_port()
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "prlhf", "-E", "UTF8", "--no-sync"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, **run_as)
    proc = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(work), "-c",
                             "listen_addresses=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=work, **run_as)
    url = f"postgresql://prlhf@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(url).close()
                break
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test PostgreSQL server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
