"""Start ``edgepack agent run`` with a crash point armed: as a plain process, or forked from a warm server.

``python -m tests.harness.agent_child agent run --config agent.toml`` arms the crash point named in the
environment (:mod:`tests.harness.crashpoints`) and runs the real CLI entry point (``edgepack.cli:main``,
the console script's target) with those arguments.

``python -m tests.harness.agent_child --fork-server`` imports everything the agent needs once and then
forks one agent per request. Why: importing edgepack, onnxruntime, uvicorn and paho costs most of an
agent's start (0.6-0.8 s of 1-1.5 s on a small machine), and the crash harness restarts the agent after
every one of its hundreds of kills. The fork happens before the agent starts any thread, so the child is
the same process a cold start makes, only sooner. Requests are JSON lines on stdin
(``{"argv": [...], "env": {...}, "log": PATH}``); the answer is ``{"pid": N}`` on stdout. The server reaps
its children and writes each one's wait status to ``LOG.exit``, so the harness sees a death there.
"""

from __future__ import annotations

import json
import os
import signal
import sys


def run_agent(argv: list[str]) -> None:
    from tests.harness.crashpoints import arm

    arm()
    from edgepack.cli import main

    sys.argv = ["edgepack", *argv]
    main()


def _reap(_signum: int, _frame: object) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        log = _logs.pop(pid, None)
        if log is not None:
            with open(log + ".exit", "w") as fh:
                fh.write(str(os.waitstatus_to_exitcode(status)))


_logs: dict[int, str] = {}


def fork_server() -> None:
    import onnxruntime  # noqa: F401
    import paho.mqtt.client  # noqa: F401
    import uvicorn  # noqa: F401

    import edgepack.agent.daemon
    import edgepack.cli
    import edgepack.runtimes.onnxruntime_backend  # noqa: F401

    signal.signal(signal.SIGCHLD, _reap)
    out = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # register the pid before it can be reaped
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(request["env"])
            code = 0
            try:
                run_agent(request["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
        _logs[pid] = request["log"]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        fork_server()
    else:
        run_agent(sys.argv[1:])
