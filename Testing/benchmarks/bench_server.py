"""The inference server against the in-process API, in one run, on loopback.

Not a test (minutes on a CPU):

    .venv/bin/python Testing/benchmarks/bench_server.py [--clients 8 --clicks 50]

Starts ``robustmedsam serve --device cpu`` (the default model) as a subprocess on 127.0.0.1,
loads the same model here, then measures:

1. click round trip on a 512 x 512 slice: the same click sequence in-process and through
   the server, click by click (slice already encoded on both); medians per click and the
   median of the paired differences (the overhead) with its quartiles;
2. propagation through a cylinder spanning 100 slices (256 x 256), stopped only by an
   empty mask: slices per second in-process and through the server (with and without
   the volume upload), and the ratio;
3. load: ``--clients`` threads, each with its own session and client, ``--clicks`` clicks
   each (5 slices per session, so the encoder runs too): errors and latency percentiles.

In-process and server runs alternate (click by click, run by run) so that machine load
hits both alike; both sides use ``--threads`` torch threads, and the in-process work runs
on a worker thread, as the server's does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from RobustMedSAMLib.datasets.phantoms import sphere
from RobustMedSAMLib.formats.volume import Volume
from RobustMedSAMLib.inference.loader import load_named_model
from RobustMedSAMLib.inference.propagation import PropagationOptions
from RobustMedSAMLib.inference.segment_volume import SegmentOptions, VolumePrompts, segment_volume
from RobustMedSAMLib.inference.session import SegmentationSession
from RobustMedSAMLib.names import DEFAULT_MODEL
from RobustMedSAMLib.server.client import ServerClient
from RobustMedSAMLib.server.protocol import apply_patch
from RobustMedSAMLib.server.sessions import ServerSession

ROOT = Path(__file__).resolve().parents[2]
RUN_UNTIL_EMPTY = {  # throughput, not stopping: every stop rule off but the empty mask
    "iou_threshold": 0.0,
    "min_area_ratio": 0.0,
    "min_likeness": 0.0,
    "min_stability": 0.0,
}


def start_server(threads: int) -> tuple[subprocess.Popen, ServerClient]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    env.pop("ROBUSTMEDSAM_TOKEN", None)
    command = [sys.executable, "-m", "RobustMedSAMLib", "serve", "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    ready = json.loads(process.stdout.readline())
    return process, ServerClient(ready["url"], ready["token"])


_WORKER = ThreadPoolExecutor(1)  # one long-lived thread, like the server's thread pool


def on_thread(function, *args):
    """``function(*args)`` on a worker thread (as the server runs model work); its result."""
    return _WORKER.submit(function, *args).result()


def volume_of(phantom) -> Volume:
    return Volume(phantom.image, phantom.ijk_to_ras, "bench")


def click_points(volume: Volume, count: int, seed: int = 0) -> np.ndarray:
    """``count`` RAS points on the middle axial slice, inside its central half."""
    rng = np.random.default_rng(seed)
    k, rows, cols = volume.shape[0] // 2, volume.shape[1], volume.shape[2]
    ijk = np.stack(
        [
            rng.uniform(cols / 4, 3 * cols / 4, count),
            rng.uniform(rows / 4, 3 * rows / 4, count),
            np.full(count, k),
        ],
        1,
    )
    return volume.ijk_to_ras_points(ijk)


def bench_clicks(model, client: ServerClient, count: int) -> dict[str, float]:
    volume = volume_of(sphere((3, 512, 512), radius=120.0))
    points = click_points(volume, count)
    local = session = SegmentationSession(volume, model.predictor())
    on_thread(local.encoded, 1)
    remote = client.open_session(volume.array, volume.ijk_to_ras)
    remote.encode_ahead([1])
    remote.click(points[0])  # waits for the encoding; not timed
    remote.undo()
    in_process, served = [], []
    for point in points:
        ijk = volume.ras_to_ijk_points(point[None])[0]
        start = time.perf_counter()
        on_thread(local.click, 1, (ijk[0], ijk[1]))
        in_process.append(time.perf_counter() - start)
        start = time.perf_counter()
        remote.click(point)
        served.append(time.perf_counter() - start)
    remote.close()
    local, served = 1000 * np.array(in_process), 1000 * np.array(served)
    difference = served - local  # paired: the same click, moments apart
    return {
        "in_process_ms": np.median(local),
        "server_ms": np.median(served),
        "overhead_ms": np.median(difference),
        "q25_ms": np.percentile(difference, 25),
        "q75_ms": np.percentile(difference, 75),
        **protocol_costs(client, volume, session),
    }


def protocol_costs(client: ServerClient, volume: Volume, session) -> dict[str, float]:
    """The model-free parts of a click: an authenticated HTTP round trip (``/health``),
    and the mask work the server and client add (diff, patch, JSON, apply) on 512x512."""
    health = []
    for _ in range(200):
        start = time.perf_counter()
        client.health()
        health.append(time.perf_counter() - start)
    server = ServerSession("bench", "owner", session)
    rng = np.random.default_rng(2)
    patch_work = []
    for _ in range(200):
        new = rng.random(volume.shape[1:]) > 0.5
        start = time.perf_counter()
        answer = json.dumps({"slice": 1, "score": 0.5, "patch": server.change_slice(1, new)})
        apply_patch(np.zeros(volume.shape, bool), json.loads(answer)["patch"])
        patch_work.append(time.perf_counter() - start)
    return {"health_ms": 1000 * np.median(health), "patch_ms": 1000 * np.median(patch_work)}


def cylinder_volume(slices: int = 100, size: int = 256) -> Volume:
    """A CT-like bright cylinder (120 HU in 40 HU) through every axial slice."""
    rows, cols = np.mgrid[:size, :size]
    disc = (rows - size / 2) ** 2 + (cols - size / 2) ** 2 < (size / 5) ** 2
    image = np.where(disc, 120, 40).astype(np.int16)
    image = np.repeat(image[None], slices, axis=0)
    return Volume(image, np.diag([-1.0, -1.0, 1.5, 1.0]), "cylinder")


def bench_propagation(model, client: ServerClient, repeats: int) -> dict[str, float]:
    volume = cylinder_volume()
    centre = volume.ijk_to_ras_points([[128.0, 128.0, 50.0]])
    options = SegmentOptions(propagate=True, propagation=PropagationOptions(**RUN_UNTIL_EMPTY))
    times: dict[str, list[float]] = {"in_process": [], "server": [], "upload": []}
    slices = 0
    for _ in range(repeats):
        start = time.perf_counter()
        session = SegmentationSession(volume, model.predictor())
        result = on_thread(segment_volume, session, VolumePrompts(positive=centre), options)
        times["in_process"].append(time.perf_counter() - start)
        slices = int(result.mask.any(axis=(1, 2)).sum())
        start = time.perf_counter()
        with client.open_session(volume.array, volume.ijk_to_ras) as remote:
            times["upload"].append(time.perf_counter() - start)
            remote.segment(centre, propagate=True, options=RUN_UNTIL_EMPTY)
            times["server"].append(time.perf_counter() - start)
            assert np.array_equal(remote.mask, result.mask), "server mask != in-process mask"
    local, served, upload = (float(np.median(times[k])) for k in ("in_process", "server", "upload"))
    return {
        "slices": slices,
        "in_process_per_s": slices / local,
        "server_per_s": slices / served,
        "ratio": local / served,
        "upload_s": upload,
        "ratio_after_upload": local / (served - upload),
    }


def bench_load(client: ServerClient, clients: int, clicks: int) -> dict[str, float]:
    volume = volume_of(sphere((5, 128, 128), radius=40.0))
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one_client(seed: int) -> None:
        own = ServerClient(client.url, client.token, timeout=120)
        rng = np.random.default_rng(seed)
        try:
            with own.open_session(volume.array, volume.ijk_to_ras) as remote:
                for _ in range(clicks):
                    ijk = [rng.uniform(40, 88), rng.uniform(40, 88), rng.integers(0, 5)]
                    point = volume.ijk_to_ras_points([ijk])[0]
                    start = time.perf_counter()
                    remote.click(point)
                    with lock:
                        latencies.append(time.perf_counter() - start)
        except Exception as error:  # noqa: BLE001 - counted and printed
            with lock:
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=one_client, args=(s,)) for s in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    wall = time.perf_counter() - start
    ms = 1000 * np.array(latencies or [np.nan])
    for error in errors[:5]:
        print("error:", error)
    return {
        "clicks": len(latencies),
        "errors": len(errors),
        "seconds": wall,
        "p50_ms": np.percentile(ms, 50),
        "p90_ms": np.percentile(ms, 90),
        "p99_ms": np.percentile(ms, 99),
        "max_ms": ms.max(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=50, help="per load-test client")
    parser.add_argument("--round-trips", type=int, default=200, help="paired clicks, 512x512")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="propagation runs per side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    model = load_named_model(DEFAULT_MODEL, device="cpu")
    process, client = start_server(args.threads)
    try:
        print(
            f"{platform.node()}: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), {DEFAULT_MODEL}"
        )
        clicks = bench_clicks(model, client, args.round_trips)
        print(
            "click 512x512: in-process {in_process_ms:.1f} ms, server {server_ms:.1f} ms, "
            "overhead (median of paired differences) {overhead_ms:.1f} ms, quartiles "
            "{q25_ms:.1f}..{q75_ms:.1f} ms (goal <= 10); model-free parts: HTTP round trip "
            "{health_ms:.1f} ms + mask patch work {patch_ms:.1f} ms".format(**clicks)
        )
        spread = bench_propagation(model, client, args.repeats)
        print(
            "propagation {slices} slices: in-process {in_process_per_s:.1f}/s, server "
            "{server_per_s:.1f}/s (upload {upload_s:.2f} s), ratio {ratio:.3f}, without the "
            "upload {ratio_after_upload:.3f} (goal >= 0.95)".format(**spread)
        )
        load = bench_load(client, args.clients, args.clicks)
        print(
            f"load {args.clients} clients x {args.clicks} clicks: "
            + "{clicks} clicks, "
            "{errors} errors in {seconds:.1f} s; latency p50 {p50_ms:.0f} ms, p90 {p90_ms:.0f}"
            " ms, p99 {p99_ms:.0f} ms, max {max_ms:.0f} ms".format(**load)
        )
    finally:
        process.terminate()
        process.wait(30)
    return 0 if load["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
