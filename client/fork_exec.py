"""A SuperExec for one site that starts each ClientApp task by forking a process that has imported torch.

Flower 1.41 runs every train/evaluate message in a fresh `flwr-clientapp` process, and importing
torch, timm and leukfed takes 6 s of CPU; with several processes starting at once on a small
machine that becomes tens of seconds of every round. This runs Flower's own SuperExec loop
(`run_superexec`, polling the SuperNode's Runtime API) with one change, the executor: the executor
process imports the ClientApp's modules once (without running any torch operation, so forking
stays safe), and each ClientApp task becomes a forked child that runs Flower's `flwr-clientapp`
main with the task's token, as gunicorn's preload or Python's forkserver do.

Approval (client/approval.py) is kept: the imported code is the code `leuk-client` verified at
start, each child checks the task's app bundle and the installed code again before running, and
if the installed files change after start, tasks go to the site's guarded launcher instead (a
fresh process, which refuses unapproved code) until `leuk-client` restarts.

Run by `SuperNode` (client/supernode.py) next to `flower-supernode --isolation process`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TASK_POLL_INTERVAL_S = "0.2"       # Flower's default is 1 s between Runtime API polls


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} leuk-superexec: {text}", flush=True)


class ForkingExecutor:
    """Flower's Executor protocol: ClientApp tasks run in forked children, other tasks start cold."""

    def __init__(self, runtime_api_address: str, approvals: str, launcher: str) -> None:
        from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

        from leukfed.client.approval import package_root, stdlib_manifest, verify
        from leukfed.common.errors import LeukError

        self.runtime_api_address = runtime_api_address
        self.approvals = approvals
        self.launcher = launcher
        self.cold = SubprocessExecutor()
        self.children: set[int] = set()
        self.root = package_root()
        self.manifest = stdlib_manifest(self.root)
        self.code_changed = False
        try:
            verify(approvals)  # the code about to be imported is the approved code
        except LeukError as refusal:  # the launcher refuses each task with this reason
            self.code_changed = True
            _say(f"not preparing processes: {refusal}")
            return
        import flwr.supernode.cli.flwr_clientapp  # noqa: F401  (what each child runs: 1 s of imports)
        import flwr.supernode.runtime.run_clientapp  # noqa: F401

        import leukfed.client.client_app  # noqa: F401  (torch, flwr, leukfed: imported once, here)
        import leukfed.models  # noqa: F401

    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return self.cold.get_eligible_capacity(supported_task_types, insecure=insecure,
                                               root_certificates_path=root_certificates_path)

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def _same_code(self) -> bool:
        from leukfed.client.approval import stdlib_manifest

        if not self.code_changed and stdlib_manifest(self.root) != self.manifest:
            self.code_changed = True
            _say("the installed leukfed code changed since leuk-client started: tasks now start as fresh, "
                 "checked processes; restart leuk-client to fork them again")
        return not self.code_changed

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        args = ["--runtime-api-address", spec.runtime_api_address, "--insecure", "--token", spec.token]
        if (spec.task_type != TaskType.CLIENT_APP or spec.runtime_api_address != self.runtime_api_address
                or not spec.insecure or spec.runtime_dependency_install):
            return self.cold.launch(spec)
        if not self._same_code():
            self.children.add(subprocess.Popen([self.launcher, *args]).pid)
            return LaunchResult.accepted()
        pid = os.fork()
        if pid == 0:
            _run_task(self.approvals, args)  # never returns
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Between polls: reap finished tasks."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        self.reconcile()


def _run_task(approvals: str, args: list[str]) -> None:
    """In the forked child: Flower's flwr-clientapp main for one task, then exit without returning."""
    code = 1
    try:
        from leukfed.client.approval import guarded_clientapp_main
        from leukfed.common.errors import LeukError
        from leukfed.common.flower.patches import apply_patches

        try:
            apply_patches("clientapp")
        except LeukError as err:
            print(f"error: {err}", flush=True)
            raise SystemExit(2) from None
        sys.argv = ["flwr-clientapp", *args, "--parent-pid", str(os.getppid())]
        guarded_clientapp_main(approvals)
        code = 0
    except SystemExit as done:  # flwr-clientapp ends with sys.exit
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--approvals", required=True, help="the site's approvals file")
    parser.add_argument("--launcher", required=True, help="the site's guarded flwr-clientapp (fresh processes)")
    parser.add_argument("--parent-pid", type=int, required=True, help="the flower-supernode process")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL_S)

    from leukfed.common.errors import LeukError
    from leukfed.common.flower.patches import apply_patches, install

    try:
        apply_patches("superexec")
    except LeukError as err:
        sys.exit(f"error: {err}")
    from flwr.supercore.superexec import run_superexec as superexec

    executor = ForkingExecutor(args.runtime_api_address, args.approvals, args.launcher)
    # Flower picks the executor by type inside run_superexec; ours replaces the subprocess one.
    install("forking-executor", lambda _flower_get_executor: lambda *_, **__: executor)
    sys.argv[0] = "leuk-superexec"
    superexec.run_superexec(runtime_api_address=args.runtime_api_address, insecure=True,
                            parent_pid=args.parent_pid, runtime_dependency_install=False)


if __name__ == "__main__":
    main()
