"""The top of a py-spy profile: where the gateway process spends its CPU under load.

`pyspy_command` samples a running process by PID (non-blocking, so the gateway is not paused
for each sample) into py-spy's raw "collapsed stacks" format, one line per distinct stack:
`frame;frame;...;frame count`. `summarise` turns that into two tables, by self time (the frame
on top of the stack) and by total time (anywhere on the stack), with paths shortened. Idle time
(the event loop waiting in epoll) is not sampled, so percentages are of busy time.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*)\)$")
_TRIM = re.compile(r"^.*?/(site-packages|lib/python3\.\d+|work/main)/")


def pyspy_available() -> bool:
    return shutil.which("py-spy") is not None


def pyspy_command(pid: int, seconds: float, raw: Path, rate: int = 250) -> list[str]:
    return [
        "py-spy",
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--function",
        "--nonblocking",
        "--threads",
        "--output",
        str(raw),
    ]


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = _TRIM.sub("", match["file"])
    file = re.sub(r":\d+$", "", file)
    return f"{match['name']} ({file})"


def summarise(raw_text: str, top: int = 30, title: str = "") -> str:
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in raw_text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        raw_frames = stack.split(";")
        if raw_frames[0].startswith("thread ("):  # --threads: "thread (tid): name"
            threads[raw_frames[0].partition(": ")[2] or raw_frames[0]] += count
            raw_frames = raw_frames[1:] or ["(no Python frame)"]
        frames = [_short(f) for f in raw_frames]
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    lines = [title, f"{samples} samples of busy time (idle event-loop waits are not sampled)"]
    if threads:
        # Worker threads (asyncio_N: asyncio.to_thread) also count while they wait for the GIL.
        lines.append(
            "by thread: "
            + ", ".join(
                f"{name} {100 * n / max(samples, 1):.1f}%" for name, n in threads.most_common()
            )
        )
    lines.append("")
    for heading, counter in (("self", own), ("total (inclusive)", total)):
        lines.append(f"top {top} by {heading} time:")
        lines.append(f"{'%':>6}  {'samples':>7}  function (file)")
        for frame, count in counter.most_common(top):
            lines.append(f"{100 * count / max(samples, 1):6.1f}  {count:7d}  {frame}")
        lines.append("")
    return "\n".join(lines)
