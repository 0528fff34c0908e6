"""Real processes for the guard's security tests: leuk-server and leuk-client on loopback with TLS and
site keys, plus stock `flower-supernode`s whose ClientApp misbehaves (a key registered behind the
coordinator's back, or a registered site that lies)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

from leukfed.common.synthetic import make_synthetic_dataset
from leukfed.client.policy import SitePolicy
from leukfed.common.flower.env import flower_env, flower_executable, free_port
from leukfed.simulations.loopback import ENV, LoopbackFederation, cli

# A poisoned ClientApp: the same leukfed code, but every update it sends is ROGUE_SCALE x the model, its
# example count is ROGUE_EXAMPLES (when set), and any task that reaches it leaves the ROGUE_MARKER file.
POISON = textwrap.dedent('''
    import importlib.abc, importlib.machinery, os, sys
    from pathlib import Path

    class Poison(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "leukfed.client.client_app":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                honest_encode, honest_classes, honest_reply = module.encode_state, module.site_class_names, module._reply
                scale = float(os.environ["ROGUE_SCALE"])

                def extreme(state, *args, **kwargs):
                    Path(os.environ["ROGUE_MARKER"]).write_text("asked to train")
                    return honest_encode({k: v * scale if v.is_floating_point() else v for k, v in state.items()},
                                         *args, **kwargs)

                def reply(*args, **kwargs):
                    if os.environ.get("ROGUE_EXAMPLES"):
                        kwargs["num_examples"] = int(os.environ["ROGUE_EXAMPLES"])
                    return honest_reply(*args, **kwargs)

                def classes(*args, **kwargs):
                    Path(os.environ["ROGUE_MARKER"]).write_text("asked for classes")
                    return honest_classes(*args, **kwargs)
                module.encode_state, module.site_class_names, module._reply = extreme, classes, reply
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Poison())
''')


class Federation(LoopbackFederation):
    """Synthetic data for every site and for a rogue; the coordinator's Control API at hand."""

    def __init__(self, root: Path, sites: list[str]) -> None:
        super().__init__(root, sites)
        for i, site in enumerate([*sites, "rogue"]):
            make_synthetic_dataset(root / f"data-{site}", per_class=10, size=28, seed=20 + i)

    def flwr(self, *args: str) -> dict:
        """Flower's CLI over the coordinator's own connection to its SuperLink (the Control API)."""
        home = self.state / "superlink" / "flwr-home"
        out = subprocess.run([flower_executable("flwr"), *args, "leukfed", "--format", "json"], cwd=home,
                             env=flower_env(home), capture_output=True, text=True, timeout=120)
        data = json.loads(out.stdout[out.stdout.find("{"):])
        assert data.get("success"), out.stdout + out.stderr
        return data

    def serverapp_log(self) -> str:
        """What the ServerApp printed so far (`flwr log RUN --show`)."""
        run_id = next(ln.split()[1] for ln in self.log("server.log").splitlines() if ln.startswith("run "))
        home = self.state / "superlink" / "flwr-home"
        return subprocess.run([flower_executable("flwr"), "log", run_id, "leukfed", "--show"], cwd=home,
                              env=flower_env(home), capture_output=True, text=True, timeout=120).stdout

    def node_status(self) -> dict[int, str]:
        return {int(n["node-id"]): n["status"] for n in self.flwr("supernode", "list")["nodes"]}

    def registered_sites(self) -> dict[str, int]:
        lines = [ln.split() for ln in self.log("server.log").splitlines() if ln.startswith("registered site ")]
        return {words[2]: int(words[4].rstrip(")")) for words in lines}

    def register_behind_back(self, name: str) -> tuple[int, Path]:
        """A key the coordinator never registered, registered through the Control API behind its back."""
        outside = self.root / "certs-outside"
        shutil.copytree(self.certs, outside)     # the CA is public; the key made here is never registered by it
        subprocess.run([*cli("cli"), "certs", "add-site", "--out", str(outside), name], check=True, env=ENV,
                       capture_output=True)
        keys = outside / "sites" / name
        return int(self.flwr("supernode", "register", str(keys / "site.pub"))["node-id"]), keys

    def stock_node(self, name: str, keys: Path, *, scale: float = 1000.0, examples: int = 0) -> subprocess.Popen:
        """A stock `flower-supernode` with the site key in `keys`, running the poisoned ClientApp."""
        poison = self.root / f"{name}-python"
        poison.mkdir()
        (poison / "sitecustomize.py").write_text(POISON)
        env = {**flower_env(self.root / f"{name}-home"), "ROGUE_MARKER": str(self.root / f"{name}-was-asked"),
               "ROGUE_SCALE": str(scale), "ROGUE_EXAMPLES": str(examples or ""),
               "PYTHONPATH": os.pathsep.join([str(poison), os.environ.get("PYTHONPATH", "")])}
        policy = self.root / f"{name}-policy.toml"  # a lying site sets its own policy as it likes
        policy.write_text(SitePolicy(min_sites=1, min_metric_examples=1).to_toml())
        config = f'data-path="{self.root / f"data-{name}"}" site-name="{name}" site-policy="{policy}"'
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen([flower_executable("flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
                                 "--root-certificates", str(self.certs / "ca.crt"), "--auth-supernode-private-key",
                                 str(keys / "site.key"), "--node-config", config, "--port", str(free_port())],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc
