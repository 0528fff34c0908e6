"""Fill deploy/wheelhouse/ with every wheel the images install, so that their builds run offline.

    python3 deploy/wheelhouse.py [--constraints FILE] [--torch 2.13.0+cpu] [--flwr 1.41.0]

Wheels are taken from the machine's pip configuration (PyPI and its local caches). The versions of
an existing installation can be pinned with --constraints (`pip freeze` of the tested environment).
torch is the CPU build (`torch==2.13.0+cpu` unless --torch says otherwise: PyPI's default Linux wheel
is a multi-GB CUDA build). PyPI's torchvision is a CUDA build whose compiled ops fail to load beside
a CPU torch, and its import then fails ("operator torchvision::nms does not exist"); with no CPU
torchvision reachable, the matching PyPI wheel is repacked as `X.Y.Z+cpunoops`: its compiled ops and
CUDA libraries removed, and the two fake-kernel registrations that need them made conditional.
leukfed uses only torchvision's pure-Python transforms. Where a CPU torchvision can be had (the
PyTorch CPU index), use that instead. Generated, never committed (.gitignore).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELHOUSE = ROOT / "deploy" / "wheelhouse"
TORCHVISION_FOR_TORCH = {"2.13": "0.28.0", "2.14": "0.29.1"}
LOCAL_TAG = "cpunoops"
# Pins never taken from --constraints: torch's build is chosen here, leukfed is built in the image.
SKIPPED_PINS = re.compile(r"^(?:(?:torch|torchvision|triton|leukfed)==|nvidia[-_]|-e |#)|.* @ ", re.IGNORECASE)
FAKE_GUARD = (
    "\n\ndef _register_fake_if_ops(name):  # repacked for a CPU torch: the compiled ops were removed\n"
    "    if torchvision.extension._has_ops():\n"
    "        return torch.library.register_fake(name)\n"
    "    return lambda fn: fn\n"
)


def project_requirements(extras: list[str]) -> list[str]:
    """leukfed's dependencies and the given extras, read from pyproject.toml (no build of leukfed)."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = list(pyproject["project"]["dependencies"]) + list(pyproject["build-system"]["requires"])
    for extra in extras:
        requirements += pyproject["project"]["optional-dependencies"][extra]
    return requirements + ["wheel"]  # for setuptools releases that still build wheels through it


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def repack_torchvision(source: Path, out_dir: Path) -> Path:
    """Write torchvision X+cpunoops: no compiled ops, no CUDA libraries, imports beside a CPU torch."""
    version = source.name.split("-")[1]
    new_version = f"{version}+{LOCAL_TAG}"
    old_info, new_info = f"torchvision-{version}.dist-info", f"torchvision-{new_version}.dist-info"
    target = out_dir / source.name.replace(f"-{version}-", f"-{new_version}-")
    records: list[str] = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            name = item.filename
            if name.endswith(".so") or ".so." in name or name.startswith("torchvision.libs/") or name.endswith("/RECORD"):
                continue
            data = src.read(name)
            if name == "torchvision/_meta_registrations.py":
                text = data.decode()
                text = text.replace("import torchvision.extension  # noqa: F401\n",
                                    "import torchvision.extension  # noqa: F401\n" + FAKE_GUARD, 1)
                text, count = re.subn(r"@torch\.library\.register_fake\(", "@_register_fake_if_ops(", text)
                if count == 0 or "_register_fake_if_ops(name)" not in text:
                    raise SystemExit(f"wheelhouse: error: {source.name}: the registrations to guard were not found")
                data = text.encode()
            if name.startswith(old_info + "/"):
                name = new_info + name[len(old_info):]
                if name.endswith("/METADATA"):
                    data = data.replace(f"\nVersion: {version}\n".encode(), f"\nVersion: {new_version}\n".encode(), 1)
            dst.writestr(name, data)
            records.append(record_line(name, data))
        records.append(f"{new_info}/RECORD,,")
        dst.writestr(f"{new_info}/RECORD", "\n".join(records) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--constraints", type=Path, help="pip constraints (e.g. `pip freeze` of the tested environment)")
    parser.add_argument("--torch", default="2.13.0+cpu", help="torch version (a CPU build) [2.13.0+cpu]")
    parser.add_argument("--flwr", default="1.41.0", help="flwr version, as the Dockerfiles' FLWR_VERSION [1.41.0]")
    parser.add_argument("--extras", default="fast,dp", help="leukfed extras to include [fast,dp]")
    args = parser.parse_args()
    WHEELHOUSE.mkdir(exist_ok=True)
    torchvision = TORCHVISION_FOR_TORCH[".".join(args.torch.split(".")[:2])]
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--only-binary=:all:", "-d", tmp, f"torchvision=={torchvision}")
        (source,) = Path(tmp).glob("torchvision-*.whl")
        for old in WHEELHOUSE.glob("torchvision-*.whl"):
            old.unlink()
        repacked = repack_torchvision(source, WHEELHOUSE)
    constraints: list[str] = []
    if args.constraints:
        pinned = WHEELHOUSE / "constraints.txt"
        pinned.write_text("".join(line for line in args.constraints.read_text().splitlines(keepends=True)
                                  if not SKIPPED_PINS.match(line)))
        constraints = ["-c", str(pinned)]
    requirements = project_requirements([e for e in args.extras.split(",") if e])
    # --find-links: the repacked torchvision satisfies torchvision requirements without PyPI's CUDA build.
    pip("wheel", "--wheel-dir", str(WHEELHOUSE), "--find-links", str(WHEELHOUSE), *constraints,
        f"torch=={args.torch}", f"torchvision=={repacked.name.split('-')[1]}",
        f"flwr[simulation]=={args.flwr}", *requirements)
    cuda = sorted(p.name for p in WHEELHOUSE.glob("nvidia_*.whl")) + sorted(p.name for p in WHEELHOUSE.glob("triton-*.whl"))
    if cuda:
        raise SystemExit(f"wheelhouse: error: CUDA wheels were pulled in: {', '.join(cuda[:3])} ...")
    size = sum(p.stat().st_size for p in WHEELHOUSE.glob("*.whl")) / 1e6
    print(f"wheelhouse: {len(list(WHEELHOUSE.glob('*.whl')))} wheels, {size:.0f} MB in {WHEELHOUSE}")


if __name__ == "__main__":
    main()
