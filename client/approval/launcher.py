#!/usr/bin/env python3
"""leukfed's guarded `flwr-clientapp`: nothing unapproved runs before the site's approval is checked.

`leukfed.client.approval.enforce.write_guarded_launcher` copies this file (standard library only) to
STATE/bin/flwr-clientapp with the shebang `#!PYTHON -S`, so Python has neither added site-packages
nor run any `.pth` start-up hook when it starts; beside it go `leukfed_approval_manifest.py` (a copy
of manifest.py) and `leukfed-launcher.json` (package folder, approvals file, bytecode folder).
Flower's SubprocessExecutor starts every task as `flwr-clientapp ...` through PATH; leuk-client
starts its forking SuperExec as `flwr-clientapp --leuk-superexec ...`. On every start:
  1. hash every file of the leukfed package and compare with the site's latest approval;
  2. run Python's site set-up, executing only the approved start-up hooks (others are skipped);
  3. make sure `import leukfed` finds the approved folder, and compile its modules from the verified
     sources (no bytecode cache of leukfed is read or written: a planted `__pycache__/*.pyc` never runs).
Approved: leuk-client's forking SuperExec, or Flower's flwr-clientapp with each task's bundle checked
before Flower unpacks it. Refused: Flower's own runner (no leukfed import), answering every task with
the reason. LEUK_GUARD_CHECK_ONLY=1: print the verdict and exit (0 approved, 3 refused).
"""
import importlib.machinery
import importlib.util
import json
import os
import sys

CONFIG_NAME = "leukfed-launcher.json"
MANIFEST_FILE = "leukfed_approval_manifest.py"
CHECK_ONLY_ENV = "LEUK_GUARD_CHECK_ONLY"
SUPEREXEC_FLAG = "--leuk-superexec"
REFUSED_EXIT = 3


class CodeNotApproved(RuntimeError):
    """Why every task is refused (the coordinator sees it as the task's error)."""


def _beside_me(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


class SourceOnlyLoader(importlib.machinery.SourceFileLoader):
    """Compiles a module from its source file every time; never reads or writes cached bytecode."""

    def get_code(self, fullname):
        path = self.get_filename(fullname)
        return self.source_to_code(self.get_data(path), path)


class VerifiedSourceFinder:
    """Meta path finder for leukfed.*: the approved folder, source files through SourceOnlyLoader."""

    def __init__(self, root):
        self.root = os.path.realpath(root)

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "leukfed":
            init = os.path.join(self.root, "__init__.py")
            return importlib.util.spec_from_file_location(fullname, init, loader=SourceOnlyLoader(fullname, init),
                                                          submodule_search_locations=[self.root])
        if not fullname.startswith("leukfed."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and type(spec.loader) is importlib.machinery.SourceFileLoader:
            spec.loader = SourceOnlyLoader(fullname, spec.origin)
            spec.cached = None
        return spec


def load_manifest_module():
    """The copy of manifest.py written beside this launcher when the code was verified."""
    path = _beside_me(MANIFEST_FILE)
    spec = importlib.util.spec_from_file_location("leukfed_approval_manifest", path,
                                                  loader=SourceOnlyLoader("leukfed_approval_manifest", path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def start_site(approved_hooks, manifest):
    """Python's site set-up (skipped by -S), executing only the approved start-up hooks."""
    import site

    originals = site.addpackage, site.execsitecustomize, site.execusercustomize

    def checked_pth(sitedir, name, known_paths):
        files = manifest.pth_hook_files(sitedir, name)
        if all(approved_hooks.get(path) == digest for path, digest in files.items()):
            return originals[0](sitedir, name, known_paths)
        return known_paths                     # never executed; the verdict names it

    def checked_module(name, run):
        def check():
            origin = manifest.start_up_module_file(name)
            if origin is None or approved_hooks.get(origin) == manifest.file_digest(origin):
                run()
        return check

    site.addpackage = checked_pth
    site.execsitecustomize = checked_module("sitecustomize", originals[1])
    site.execusercustomize = checked_module("usercustomize", originals[2])
    try:
        site.main()
    finally:
        site.addpackage, site.execsitecustomize, site.execusercustomize = originals


def other_package(root):
    """Why `import leukfed` would not load the approved folder (None: it would)."""
    spec = importlib.util.find_spec("leukfed")
    found = os.path.dirname(os.path.realpath(spec.origin)) if spec is not None and spec.origin else None
    if found != os.path.realpath(root):
        return f"`import leukfed` would load {found or 'nothing'}, not the approved {root}"
    return None


def verdict(config, manifest):
    """None when the package and the start-up hooks are the approved ones, else the reason."""
    try:
        entry = manifest.read_latest_approval(config["approvals"])
    except manifest.ApprovalMissing as missing:
        start_site({}, manifest)               # Flower is still needed, to answer the tasks
        return str(missing)
    files = manifest.stdlib_manifest(config["root"])
    start_site(entry.get("startup_hooks", {}), manifest)
    return manifest.refusal(entry, files, manifest.startup_hooks()) or other_package(config["root"])


def refuse_every_task(reason):
    """Flower's flwr-clientapp without any leukfed import, failing each task with `reason`."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    def refuse(fab_content, *args, **kwargs):
        raise CodeNotApproved(reason)

    if not hasattr(runtime, "install_from_fab"):
        raise SystemExit("guarded flwr-clientapp: Flower's install_from_fab is gone; refusing to run: " + reason)
    runtime.install_from_fab = refuse
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


def run_superexec(args, refusal):
    """leuk-client's forking SuperExec for approved code; else Flower's own, whose tasks refuse."""
    if refusal is None:
        from leukfed.client.fork_exec import main as forking_superexec   # verified code only

        forking_superexec(args)
        return
    print("leuk-superexec: not preparing processes:", refusal, flush=True)
    options = dict(zip(args[::2], args[1::2]))
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", "--insecure", "--runtime-api-address", options["--runtime-api-address"],
                "--parent-pid", options["--parent-pid"]]
    sys.exit(flower_superexec())


def main():
    with open(_beside_me(CONFIG_NAME), encoding="utf-8") as handle:
        config = json.load(handle)
    refusal = verdict(config, load_manifest_module())
    if refusal is None:
        sys.meta_path.insert(0, VerifiedSourceFinder(config["root"]))
    if os.environ.get(CHECK_ONLY_ENV):
        print(refusal or "approved")
        sys.exit(REFUSED_EXIT if refusal else 0)
    if sys.argv[1:2] == [SUPEREXEC_FLAG]:
        run_superexec(sys.argv[2:], refusal)
    elif refusal is None:
        from leukfed.client.approval.enforce import guarded_clientapp_main   # verified code only

        guarded_clientapp_main(config["approvals"])
    else:
        refuse_every_task(refusal)


if __name__ == "__main__":
    main()
