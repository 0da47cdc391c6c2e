"""The processes a bench run starts: free ports, start, wait until listening, stop by PID.

`Processes` is the one owner of every child: `stop_all()` (called from a `finally`, so also on
Ctrl-C) stops them newest first with SIGTERM, then SIGKILL after a grace period, each by its PID,
and also any child processes they spawned themselves (the gateway's `--workers N`), by PID.
Children run in their own session so that a Ctrl-C in the terminal reaches only the bench, which
then stops them in order.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

_GRACE = 10.0


class StartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Processes:
    """Every process this run started, stopped newest first by `stop_all()`."""

    folder: Path
    running: list[Proc] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        log = self.folder / f"{name}.log"
        serial = 1
        while log.exists():  # one log per process, even when a name comes back
            serial += 1
            log = self.folder / f"{name}-{serial}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc in self.running:
            self.running.remove(proc)
        _stop(proc)

    def stop_all(self) -> None:
        while self.running:
            _stop(self.running.pop())


def _stop(proc: Proc) -> None:
    children = child_pids(proc.pid)
    if proc.alive():
        _signal(proc.pid, signal.SIGTERM)
        try:
            proc.popen.wait(_GRACE)
        except subprocess.TimeoutExpired:
            _signal(proc.pid, signal.SIGKILL)
            proc.popen.wait()
    # The parent stops its own children on SIGTERM; any that outlived it are stopped here.
    deadline = time.monotonic() + _GRACE
    for pid in children:
        while _exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _exists(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _exists(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc), e.g. the gateway's worker processes."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one live process (0 when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "; state is fields[0]
    return (int(fields[11]) + int(fields[12])) / _TICK


def busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs, idle and iowait excluded)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
    return (user + nice + system + irq + softirq) / _TICK


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (SO_REUSEPORT workers each have one)."""
    wanted = f"0100007F:{port:04X}"
    count = 0
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == wanted and fields[3] == "0A":
            count += 1
    return count


def wait_listening(proc: Proc, port: int, count: int = 1, timeout: float = 20.0) -> None:
    """Until `count` sockets listen on the port; StartError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        if listeners(port) >= count:
            return
        time.sleep(0.05)
    raise StartError(
        f"{proc.name} did not listen on port {port} within {timeout:.0f}s:\n{proc.log_tail()}"
    )
