"""A `ratekeeper serve` subprocess the tests start on a free port, and stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from support.common import TEST_DEADLINE_MS
from support.redis_servers import free_port, stop_process

__all__ = ["ServerProcess"]


class ServerProcess:
    """A `ratekeeper serve` subprocess on a free port."""

    def __init__(self, config_path: Path, env: dict[str, str], workers: int = 1) -> None:
        self.config_path = config_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = config_path.parent / f"serve-{self.port}.log"
        full_env = {**os.environ, "RATEKEEPER_REDIS_TIMEOUT_MS": str(TEST_DEADLINE_MS), **env}
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ratekeeper", "serve", "--config", str(config_path),
             "--port", str(self.port), "--workers", str(workers)],
            env=full_env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )
        self.wait_ready(workers)

    def wait_ready(self, workers: int) -> None:
        import urllib.request

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        # give the other workers a moment to bind their SO_REUSEPORT socket
                        time.sleep(0.5 if workers > 1 else 0)
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log.read_text()}")

    def stop(self) -> str:
        stop_process(self.process, timeout=20)
        self._log_file.close()
        return self.log.read_text()

