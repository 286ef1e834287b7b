"""A restartable SGLang server: the keeper runs the server command and starts it again when the trainer asks.

    python -m grpo_megatron.rollout.sglang.keeper --dir CONTROL_DIR --name NAME --url URL --log LOG \
        [--env KEY=VALUE ...] -- CMD...

The keeper is what a Slurm job's server step runs on its node (slurm/common.sh), so that the trainer, on another
node, can restart a dead or hung server without Slurm: it writes `CONTROL_DIR/NAME.restart`, the keeper kills the
server's process group (SIGKILL works on a stopped process too) and starts the command again, appending to the
same log, and records the new start in `CONTROL_DIR/NAME.json` ({"url", "log", "pid", "starts", "exit_code"}).
The keeper never restarts on its own: how often a server may be restarted is the trainer's decision
(rollout.sglang.max_restarts_per_server / _per_hour). SIGTERM (the job's cleanup) stops the server and the keeper.
The trainer finds the servers it may restart by the URLs in CONTROL_DIR/*.json (rollout.sglang.restart_dir).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.2


def state_file(control_dir: str | Path, name: str) -> Path:
    return Path(control_dir) / f"{name}.json"


def request_file(control_dir: str | Path, name: str) -> Path:
    return Path(control_dir) / f"{name}.restart"


def read_states(control_dir: str | Path) -> dict[str, dict]:
    """URL -> the keeper's record (with its "name"), for every keeper writing into `control_dir`."""
    states = {}
    for path in sorted(Path(control_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being rewritten: the next read sees it
        states[record["url"].rstrip("/")] = {**record, "name": path.stem}
    return states



def kill_process_group(process: subprocess.Popen) -> None:
    """SIGKILL a server's process group at once (it forks scheduler/detokenizer children, which may outlive the
    leader; SIGKILL also ends a stopped one), then reap the leader."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def stop_process_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM a running server's process group, SIGKILL after grace_s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        kill_process_group(process)

class Keeper:
    def __init__(self, control_dir: Path, name: str, url: str, log: Path, command: list[str],
                 env: dict[str, str] | None = None):
        self.control_dir, self.name, self.url, self.log, self.command = control_dir, name, url, log, command
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            if self.starts:
                log.write(f"\n===== keeper: restart {self.starts} of {self.name} at {time.ctime()} =====\n".encode())
                log.flush()
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)
        self.starts += 1
        self._record(None)

    def kill(self) -> None:
        if self.process is not None:
            kill_process_group(self.process)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.process is not None:
            stop_process_group(self.process, grace_s)

    def serve(self) -> None:
        request = request_file(self.control_dir, self.name)
        request.unlink(missing_ok=True)
        self.start()
        recorded_exit = False
        while True:
            if request.exists():
                self.kill()
                request.unlink(missing_ok=True)
                self.start()
                recorded_exit = False
            elif not recorded_exit and self.process.poll() is not None:
                self._record(self.process.returncode)
                recorded_exit = True
            time.sleep(POLL_S)

    def _record(self, exit_code: int | None) -> None:
        target = state_file(self.control_dir, self.name)
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"url": self.url, "log": str(self.log), "pid": self.process.pid,
                                   "starts": self.starts, "exit_code": exit_code}))
        os.replace(tmp, target)  # readers never see half a record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", required=True, type=Path, help="control directory (rollout.sglang.restart_dir)")
    parser.add_argument("--name", required=True, help="this server's name in the control directory")
    parser.add_argument("--url", required=True, help="the URL the trainer knows the server by")
    parser.add_argument("--log", required=True, type=Path)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the server's environment (repeatable)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the server command")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the server command after --")
    args.dir.mkdir(parents=True, exist_ok=True)
    env = dict(item.split("=", 1) for item in args.env)
    keeper = Keeper(args.dir, args.name, args.url.rstrip("/"), args.log, command, env)

    def on_term(*_):
        keeper.stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    keeper.serve()


if __name__ == "__main__":
    main()
