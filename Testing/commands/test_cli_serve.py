"""``robustmedsam serve`` as a parent process starts it: the ready line, the token per
start (never printed when written to a file), remote-mode tokens, bad flags; and the
client's promise to Slicer: it imports no torch."""

from __future__ import annotations

import json
import os
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from RobustMedSAMLib.cli import main
from RobustMedSAMLib.commands.serve import server_tokens
from RobustMedSAMLib.errors import ServerError
from RobustMedSAMLib.names import DEFAULT_MODEL
from RobustMedSAMLib.server.client import ServerClient

ROOT = Path(__file__).resolve().parents[2]


def start(*args: str, **env: str) -> tuple[subprocess.Popen, dict]:
    environment = {k: v for k, v in os.environ.items() if k != "ROBUSTMEDSAM_TOKEN"}
    environment.update(PYTHONPATH=str(ROOT), **env)
    process = subprocess.Popen(
        [sys.executable, "-m", "RobustMedSAMLib", "serve", "--device", "cpu", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=ROOT,
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        pytest.fail(f"serve did not start: {process.communicate()[1][-2000:]}")
    return process, json.loads(line)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(20)


def test_local_mode_token_goes_to_the_file_only(tmp_path):
    token_file = tmp_path / "token"
    process, ready = start("--token-file", str(token_file))
    try:
        assert ready["url"].startswith("http://127.0.0.1:") and "token" not in ready
        assert ready["model"] == DEFAULT_MODEL and ready["protocol"] == 1
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        client = ServerClient(ready["url"], token_file.read_text())
        health = client.health()
        assert health["model"] == DEFAULT_MODEL and health["precision"] == "float32"  # no --half
        served = next(m for m in client.models()["models"] if m["served"])
        assert served["input_size"] == 256 and served["prompts"] == ["point", "box", "mask"]
        with pytest.raises(ServerError, match="401"):
            ServerClient(ready["url"], "x" * 32).health()
        round_trips = []
        for _ in range(21):
            began = time.perf_counter()
            client.health()
            round_trips.append(time.perf_counter() - began)
        # a response waiting for the client's delayed ACK costs >= 40 ms (Linux's minimum)
        assert statistics.median(round_trips) < 0.020
    finally:
        stop(process)


def test_without_a_file_the_parent_reads_the_token_from_the_ready_line():
    process, ready = start()
    try:
        assert len(ready["token"]) >= 32
        assert ServerClient(ready["url"], ready["token"]).health()["status"] == "ok"
    finally:
        stop(process)


def test_remote_mode_tokens_from_environment_or_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBUSTMEDSAM_TOKEN", " env-token-0123456789abcdef\n")
    assert server_tokens(tmp_path / "absent") == (["env-token-0123456789abcdef"], False)
    assert not (tmp_path / "absent").exists()
    monkeypatch.delenv("ROBUSTMEDSAM_TOKEN")
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per user\nalice-0123456789abcdef\n\nbob-0123456789abcdefgh\n")
    assert server_tokens(tokens) == (["alice-0123456789abcdef", "bob-0123456789abcdefgh"], False)
    made, is_new = server_tokens(tmp_path / "new")
    assert is_new and (tmp_path / "new").read_text() == made[0] + "\n" and len(made[0]) >= 32
    assert server_tokens(None)[0] != made  # a new token per start


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-sessions", "0"], "--max-sessions must be >= 1"),
        (["--idle-timeout", "0"], "--idle-timeout must be > 0"),
        (["--ssl-keyfile", "k.pem"], "both --ssl-keyfile and --ssl-certfile"),
        (["--model", "sam", "--checkpoint", "missing.pth"], "missing.pth"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flags, message, capsys):
    assert main(["serve", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_short_token_in_file_is_refused(tmp_path, capsys):
    (tmp_path / "t").write_text("short\n")
    assert main(["serve", "--token-file", str(tmp_path / "t")]) == 2
    assert "at least 16 characters" in capsys.readouterr().err


def test_the_client_imports_no_torch():
    code = (
        "import sys, RobustMedSAMLib.server.client, RobustMedSAMLib.server.protocol\n"
        "print(sorted({'torch', 'fastapi', 'scipy'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.slow  # a second server start (~3 s idle, 15 s on a loaded CI machine)
def test_tls_with_the_servers_own_key_and_certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)  # fmt: skip
    process, ready = start("--ssl-keyfile", str(key), "--ssl-certfile", str(cert))
    try:
        assert ready["url"].startswith("https://127.0.0.1:")
        client = ServerClient(ready["url"], ready["token"], cafile=str(cert))
        assert client.health()["status"] == "ok"
        with pytest.raises(ServerError, match="CERTIFICATE_VERIFY_FAILED"):
            ServerClient(ready["url"], ready["token"]).health()  # not a trusted certificate
    finally:
        stop(process)


def test_serve_engine_runs_the_model_on_it_and_says_so(monkeypatch):
    """``serve --engine openvino`` loads the model on that engine; ``/health``'s record
    entry and the ``/v1/models`` catalogue name the engine in use (what the Slicer
    module shows); the models that cannot run on it list only eager."""
    from RobustMedSAMLib.cli import build_parser
    from RobustMedSAMLib.commands.serve import load_served_model
    from RobustMedSAMLib.inference import loader
    from RobustMedSAMLib.inference.loader import LoadedModel
    from RobustMedSAMLib.model.config import LITE_MEDSAM
    from RobustMedSAMLib.model.sam import SegmentAnythingModel

    asked = {}

    def load(name, checkpoint, encoder, decoder, device, half, fast_cpu, engine="eager"):
        asked.update(name=name, device=device, engine=engine)
        model = SegmentAnythingModel(LITE_MEDSAM, robust=False)
        return LoadedModel(name, model, "litemedsam", {}, half, engine)

    monkeypatch.setattr(loader, "load_named_model", load)
    args = build_parser().parse_args(["serve", "--device", "cpu", "--engine", "openvino"])
    served = load_served_model(args)
    assert asked == {"name": DEFAULT_MODEL, "device": "cpu", "engine": "openvino"}
    assert served.info["engine"] == "openvino"
    catalogue = {entry["name"]: entry for entry in served.catalogue}
    assert catalogue[DEFAULT_MODEL]["engine"] == "openvino" and catalogue[DEFAULT_MODEL]["served"]
    for lite in ("litemedsam", "robustmedsam-lite"):
        assert catalogue[lite]["engines"] == ["eager", "onnx", "openvino"]
    assert catalogue["sam"]["engine"] is None and catalogue["sam"]["engines"] == ["eager"]
