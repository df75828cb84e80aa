"""A real inference server on 127.0.0.1 (ephemeral port) for tests and benchmarks:
in a thread of this process (``LiveServer``), or as a process with a test double
(``python Testing/server_harness.py --delay S``: prints the ready line, as `serve`)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from doubles import BoxBlobPredictor, ThresholdPredictor  # noqa: E402

from RobustMedSAMLib.commands.serve import listening_socket  # noqa: E402
from RobustMedSAMLib.server.app import (  # noqa: E402
    ServedModel,
    ServerConfig,
    create_app,
    model_catalogue,
)

THRESHOLD = 80.0  # the phantoms' background is 40 HU, their objects 120
TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "other-token-0123456789abcdef"
HERE = Path(__file__).resolve()


def start_harness(*args: str) -> tuple[subprocess.Popen, str]:
    """This file as a server process with the threshold double (``args``: its options,
    e.g. ``--delay 0.1``): ``(process, url)`` once it listens; the caller kills it."""
    paths = [str(HERE.parents[1]), str(HERE.parent)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    process = subprocess.Popen(
        [sys.executable, str(HERE), *args], stdout=subprocess.PIPE, text=True, env=env
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError("the test server did not start")
    return process, json.loads(line)["url"]


class SlowPredictor(ThresholdPredictor):
    """ThresholdPredictor taking ``delay`` seconds per mask: long jobs to cancel or kill."""

    def __init__(self, delay: float) -> None:
        super().__init__(THRESHOLD)
        self.delay = delay

    def predict(self, prompt):
        time.sleep(self.delay)
        return super().predict(prompt)


def served(make_predictor, name: str = "litemedsam", input_size: int | None = None) -> ServedModel:
    """A ServedModel around a predictor factory (named as a registry model)."""
    info = {"name": name, "preprocessing": "medsam", "device": "cpu", "files": {}}
    return ServedModel(
        name, make_predictor, info, input_size, name, model_catalogue(name, input_size)
    )


def box_blob_model() -> ServedModel:
    """``BoxBlobPredictor``: a box-only model as LiteMedSAM behaves (a point alone: nothing)."""
    return served(lambda: BoxBlobPredictor(THRESHOLD))


def threshold_model(delay: float = 0.0) -> ServedModel:
    if delay:
        return served(lambda: SlowPredictor(delay))
    return served(lambda: ThresholdPredictor(THRESHOLD))


class LiveServer:
    """``with LiveServer(model, **limits) as server: server.url``: uvicorn on a thread."""

    def __init__(self, model: ServedModel, **limits) -> None:
        limits.setdefault("tokens", [TOKEN, OTHER_TOKEN])
        self.config = ServerConfig(**limits)
        self.app = create_app(self.config, model)
        self.sock = listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)

    @property
    def store(self):
        return self.app.state.store

    def __enter__(self) -> LiveServer:
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.stop()
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--idle", type=float, default=900.0)
    parser.add_argument("--box-only", action="store_true", help="serve BoxBlobPredictor")
    args = parser.parse_args()
    model = box_blob_model() if args.box_only else threshold_model(args.delay)
    sock = listening_socket("127.0.0.1", 0)
    app = create_app(ServerConfig([TOKEN], idle_seconds=args.idle), model)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    name = "box-blob" if args.box_only else "threshold"
    line = json.dumps({"url": url, "pid": os.getpid(), "token": TOKEN, "model": name})

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            print(line, flush=True)

    Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


if __name__ == "__main__":
    main()
