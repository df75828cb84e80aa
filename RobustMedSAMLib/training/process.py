"""Run ``python -m RobustMedSAMLib finetune`` as a subprocess that a GUI can watch.

Standard library only (the Slicer panel imports it before torch is there). Reader
threads put the child's JSON lines (events ``start``, ``cache``, ``val``, ``step``,
``stopped``, ``done``; see ``training/runner.py``) into a queue; the GUI calls
:meth:`FinetuneProcess.poll` from a timer and never blocks. When the child has exited
and its output is read, one last event ``{"event": "exited", "returncode": N,
"error": TEXT or None}`` follows.

Stopping: the runner finishes its step, saves and exits on SIGINT/SIGTERM; the run
can then be resumed (``resume=True``). On Windows the child gets its own process
group and a CTRL_BREAK_EVENT (graceful when the runner handles SIGBREAK).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

WINDOWS = sys.platform == "win32"
ERROR_TAIL_LINES = 40


def library_root() -> Path:
    """The folder holding the ``RobustMedSAMLib`` package (put on the child's path)."""
    return Path(__file__).resolve().parent.parent


class FinetuneProcess:
    """One fine-tuning run in a child process.

    config: the TOML config; out_dir: the run folder (new or empty; with ``resume``
    the folder of the run to continue); python: the interpreter (in Slicer pass
    ``shutil.which("PythonSlicer")``); env: extra environment variables;
    stop_after: stop (as on a stop request) after that many steps in all.
    """

    def __init__(
        self,
        config: Path,
        out_dir: Path,
        *,
        python: str = sys.executable,
        resume: bool = False,
        env: dict | None = None,
        stop_after: int | None = None,
    ) -> None:
        self.config = Path(config)
        self.out_dir = Path(out_dir)
        self.python = python
        self.resume = resume
        self.env = dict(env or {})
        self.stop_after = stop_after
        self._process: subprocess.Popen | None = None
        self._events: queue.Queue[dict] = queue.Queue()
        self._stderr: collections.deque[str] = collections.deque(maxlen=ERROR_TAIL_LINES)
        self._threads: list[threading.Thread] = []
        self._finished = threading.Event()
        self._final: dict | None = None  # the "done" or "stopped" event
        self._stop_requested = False
        self._killed = False
        self._watchdog: threading.Timer | None = None

    # --- starting ---

    def command(self) -> list[str]:
        """The child's command line."""
        command = [self.python, "-m", "RobustMedSAMLib", "finetune", str(self.config)]
        command += ["--out", str(self.out_dir)]
        if self.resume:
            command.append("--resume")
        if self.stop_after is not None:
            command += ["--stop-after", str(self.stop_after)]
        return command

    def child_env(self) -> dict[str, str]:
        """This environment plus ``env``, unbuffered UTF-8 output, the library on the path."""
        env = {**os.environ, **self.env}
        paths = [str(library_root()), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        return env

    def start(self) -> None:
        """Start the child and its reader threads; returns at once."""
        if self._process is not None:
            raise RuntimeError("this fine-tuning process was already started")
        options: dict = {}
        if WINDOWS:
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True  # its own process group, for kill()
        log.info("starting: %s", subprocess.list2cmdline(self.command()))
        self._process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.child_env(),
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        stderr = threading.Thread(target=self._read_stderr, daemon=True, name="finetune-stderr")
        stdout = threading.Thread(
            target=self._read_stdout, args=(stderr,), daemon=True, name="finetune-stdout"
        )
        self._threads = [stderr, stdout]
        stderr.start()
        stdout.start()

    # --- reading ---

    def _read_stdout(self, stderr_thread: threading.Thread) -> None:
        process = self._process
        assert process is not None and process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            event = parse_line(line)
            if event.get("event") in ("done", "stopped"):
                self._final = event
            self._events.put(event)
        returncode = process.wait()
        stderr_thread.join()
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._events.put({"event": "exited", "returncode": returncode, "error": self.last_error})
        self._finished.set()

    def _read_stderr(self) -> None:
        process = self._process
        assert process is not None and process.stderr is not None
        for line in process.stderr:
            self._stderr.append(line.rstrip("\r\n"))

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks)."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                return events

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until the child has exited and its output is read; its return code
        (None if still running after ``timeout`` seconds). For scripts, not GUIs."""
        if self._process is None:
            raise RuntimeError("the fine-tuning process was not started")
        self._finished.wait(timeout)
        return self.returncode if self._finished.is_set() else None

    # --- state ---

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def running(self) -> bool:
        """True from ``start()`` until the child has exited and all its output is read."""
        return self._process is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The child's exit code once it has exited (negative: killed by that signal)."""
        return None if self._process is None else self._process.poll()

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    @property
    def last_error(self) -> str | None:
        """The end of the child's stderr when it failed (non-zero exit), else None."""
        code = self.returncode
        if code is None or code == 0:
            return None
        lines = list(self._stderr)
        errors = [line for line in lines if ": error: " in line]  # the CLI's one-line message
        if errors:
            return errors[-1]
        if self._killed:
            return (
                f"the fine-tuning process was killed (exit code {code}); the run folder keeps "
                "its last save (resume to continue from it)"
            )
        if self._stop_requested:
            return (
                f"the run was stopped (exit code {code}) before it could save a step; "
                "start it again, or resume from its last save if it has one"
            )
        if code < 0:
            return f"the fine-tuning process was ended by signal {-code}"
        if lines:
            return "\n".join(lines[-20:])
        return f"the fine-tuning process ended with exit code {code}"

    @property
    def stderr_tail(self) -> list[str]:
        """The last lines of the child's stderr (its log), whatever the outcome."""
        return list(self._stderr)

    def model_path(self, best: bool = False) -> Path | None:
        """The finished model in the run folder once the run is done (``best``: the one
        with the best validation Dice, when it exists); None before, or when stopped."""
        if self._final is None or self._final.get("event") != "done":
            return None
        path = Path(self._final.get("model") or self.out_dir / "last.safetensors")
        if best:
            candidate = path.with_name("best" + "".join(path.suffixes))
            path = candidate if candidate.is_file() else path
        return path if path.is_file() else None

    # --- stopping ---

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the run to finish its step, save and exit (a resumable "stopped" run);
        kill it if it has not exited ``timeout`` seconds later. Returns at once."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        self._stop_requested = True
        try:
            if WINDOWS:
                process.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                process.send_signal(signal.SIGINT)
        except OSError:  # already gone
            return
        if self._watchdog is None:
            self._watchdog = threading.Timer(timeout, self.kill)
            self._watchdog.daemon = True
            self._watchdog.start()

    def kill(self) -> None:
        """End the child and anything it started at once (the run keeps its last save)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        log.warning("killing the fine-tuning process %d", process.pid)
        self._killed = True
        try:
            if WINDOWS:
                subprocess.run(
                    ["taskkill", "/T", "/F", "/PID", str(process.pid)],
                    capture_output=True,
                    check=False,
                )
            else:
                os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()


def parse_line(line: str) -> dict:
    """A JSON object line as a dict; anything else as ``{"event": "log", "line": line}``."""
    try:
        value = json.loads(line)
    except ValueError:
        return {"event": "log", "line": line}
    if isinstance(value, dict) and "event" in value:
        return value
    return {"event": "log", "line": line}


def progress_of(event: dict) -> tuple[int, int] | None:
    """(done, total) for a progress bar: training steps for ``start``, ``step`` and
    ``done``; images encoded for ``cache`` (a separate phase); None for other events."""
    kind = event.get("event")
    try:
        if kind in ("start", "step"):
            return int(event["step"]), int(event["total_steps"])
        if kind == "cache":
            return int(event["done"]), int(event["total"])
        if kind == "done":
            step = int(event["step"])
            return step, step
    except (KeyError, TypeError, ValueError):
        return None
    return None


def describe(event: dict) -> str:
    """One status line for an event (``"Step 12/200, loss 0.431, 3 min left"``)."""
    kind = event.get("event")
    if kind == "start":
        return (
            f"Started {event.get('mode', '')} training on {event.get('device', '?')}: "
            f"{event.get('train_samples', '?')} training slices, step "
            f"{event.get('step', 0)}/{event.get('total_steps', '?')}"
        )
    if kind == "cache":
        split = "training" if event.get("split") == "train" else "validation"
        return f"Encoding {split} images {event.get('done')}/{event.get('total')}"
    if kind == "step":
        eta = float(event.get("eta_s", 0.0))
        left = f"{eta / 60:.0f} min left" if eta >= 60 else f"{eta:.0f} s left"
        loss = event.get("loss", float("nan"))
        return f"Step {event.get('step')}/{event.get('total_steps')}, loss {loss:.3f}, {left}"
    if kind == "val":
        return f"Validation at step {event.get('step')}: Dice {event.get('val_dice', 0):.3f}"
    if kind == "done":
        return f"Done at step {event.get('step')}: model {event.get('model', '')}"
    if kind == "stopped":
        return f"Stopped at step {event.get('step')} (saved; resume to continue)"
    if kind == "exited":
        code = event.get("returncode")
        return "Finished" if code == 0 else f"Failed: {event.get('error') or f'exit code {code}'}"
    return str(event.get("line", event))
