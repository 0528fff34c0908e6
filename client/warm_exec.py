"""A SuperExec for one site whose next ClientApp process is already started and has imported torch.

Flower 1.41 runs every train/evaluate message in a fresh `flwr-clientapp` process: importing torch,
timm and leukfed costs seconds of every round at every site. This runs Flower's own SuperExec loop
(`run_superexec`, polling the SuperNode's Runtime API) with one change, the executor: it keeps one
spare ClientApp process that has done its imports and waits for a task token on stdin. A task
goes to the spare when it is ready (else it starts as Flower would start it), and the next spare
starts at once, importing while the task runs. The spare is the site's approved launcher
(`leuk-client`'s guarded `flwr-clientapp`), which checks the code before importing it and again,
with the task's app bundle, for every task.

Run by `SuperNode` (client/supernode.py) next to `flower-supernode --isolation process`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from leukfed.client.approval import WARM_ENV

TASK_POLL_INTERVAL_S = "0.2"       # Flower's default is 1 s between Runtime API polls


class WarmExecutor:
    """Flower's Executor protocol: ClientApp tasks go to a pre-started spare, other tasks start cold."""

    def __init__(self, launcher: str, runtime_api_address: str) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        self.launcher = launcher
        self.runtime_api_address = runtime_api_address
        self.cold = SubprocessExecutor()
        self.spare: subprocess.Popen[bytes] | None = None
        self.ready_file = Path.cwd() / f"clientapp-ready-{os.getpid()}"  # the spare touches it when imported
        self.active: list[subprocess.Popen[bytes]] = []

    def _command(self) -> list[str]:
        return [self.launcher, "--runtime-api-address", self.runtime_api_address, "--insecure",
                "--parent-pid", str(os.getpid())]

    def _start_spare(self) -> subprocess.Popen[bytes]:
        self.ready_file.unlink(missing_ok=True)
        return subprocess.Popen(self._command(), stdin=subprocess.PIPE,
                                env={**os.environ, WARM_ENV: str(self.ready_file)})

    def _spare_ready(self) -> bool:
        """Only a spare that has finished its imports takes a task: a task token expires 30 s after
        it is issued unless the process holding it sends heartbeats, which start after the imports."""
        return self.spare is not None and self.spare.poll() is None and self.ready_file.exists()

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self.cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                               root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if (spec.task_type != TaskType.CLIENT_APP or spec.runtime_api_address != self.runtime_api_address
                or not spec.insecure or spec.runtime_dependency_install):
            return self.cold.launch(spec)
        if self._spare_ready():
            process, self.spare = self.spare, None
            try:
                process.stdin.write(spec.token.encode() + b"\n")
                process.stdin.close()
            except OSError as exc:
                return LaunchResult.failed(f"the prepared ClientApp process did not take the task: {exc}")
        else:  # still importing (a busy machine): start this task as Flower would; the spare stays
            process = subprocess.Popen([*self._command(), "--token", spec.token])
        self.active.append(process)
        self.reconcile()  # the next spare imports while this task runs
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Between polls: reap finished tasks; keep one spare process started."""
        self.active = [p for p in self.active if p.poll() is None]
        if self.spare is None or self.spare.poll() is not None:
            self.spare = self._start_spare()

    def close(self) -> None:
        if self.spare is not None and self.spare.poll() is None:
            self.spare.stdin.close()  # an empty token: the spare exits without running anything
            try:
                self.spare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.spare.kill()
        self.ready_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--launcher", required=True, help="the site's approved flwr-clientapp launcher")
    parser.add_argument("--parent-pid", type=int, required=True, help="the flower-supernode process")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL_S)

    from flwr.supercore.superexec import run_superexec as superexec

    executor = WarmExecutor(args.launcher, args.runtime_api_address)
    # Flower picks the executor by type inside run_superexec; ours replaces the subprocess one.
    superexec.get_executor = lambda *_, **__: executor
    sys.argv[0] = "leuk-superexec"
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            parent_pid=args.parent_pid, runtime_dependency_install=False)


if __name__ == "__main__":
    main()
