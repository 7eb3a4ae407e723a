"""The console shows our lines and the log file keeps everything (run in a subprocess: capture is global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent('''
    import logging, sys, warnings
    from pathlib import Path
    from vitpose.run import console

    early = logging.getLogger("library"); early.addHandler(logging.StreamHandler(sys.stderr))
    with console.captured(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
        console.say("ours: epoch 1/2")
        print("(RayTrainWorker pid=1) \\x1b[36mlibrary noise\\x1b[0m")
        print("(RayTrainWorker pid=1) " + console.TAG + "ours: from a worker")
        print("(RayTrainWorker pid=1) " + console.TAG + "ours: from a worker")  # Ray's doubled forward
        early.warning("a library warning")
        warnings.warn("a deprecation", FutureWarning)
        sys.stdout.write("partial "); sys.stdout.write("line\\n")
        console.error("it broke")
    print("after the capture: plain again")
    early.warning("after the capture: to stderr again")
''')



def run(tmp_path: Path, verbose: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / f"run-{verbose}.log"
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out, log.read_text()


def test_default_console_has_only_our_lines_and_the_log_has_all(tmp_path):
    out, log = run(tmp_path, verbose=False)
    assert out.stdout.splitlines() == ["ours: epoch 1/2", "ours: from a worker", "after the capture: plain again"]
    assert out.stderr.splitlines() == ["error: it broke", "after the capture: to stderr again"]
    for noise in ("library noise", "a library warning", "a deprecation", "partial line"):
        assert noise in log
    assert "ours: epoch 1/2" in log and "error: it broke" in log and "\x1b[" not in log


def test_verbose_shows_everything(tmp_path):
    out, _ = run(tmp_path, verbose=True)
    shown = out.stdout + out.stderr
    for line in ("ours: epoch 1/2", "library noise", "a library warning", "a deprecation", "partial line"):
        assert line in shown
