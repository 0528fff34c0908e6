"""Hostile entries in a data folder: FIFOs and devices named like images, symlinks leading out, names that
are not UTF-8, headers declaring huge images. Each is a logged skip or one `error:` line, never a hang."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leukfed.common.data import scan_dataset
from leukfed.common.data_check import check_dataset
from leukfed.common.errors import LeukError
from leukfed.common.images import load_image

LEUK = [sys.executable, "-c", "from leukfed.cli import main; main()"]
TIMEOUT = 120  # a hang fails the test instead of blocking it
pytestmark = pytest.mark.timeout(TIMEOUT)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "LEUK_NO_PROGRESS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, errors="replace")


def site_load(root: Path):
    """The site's load path (common/site.py), as a round's task runs it."""
    from leukfed.common.fedconfig import FedConfig, SiteConfig
    from leukfed.common.site import load_site_data, site_class_names

    fed, site = FedConfig(model="tinycnn", image_size=16), SiteConfig(data_path=str(root), site_name="h1")
    return site_class_names(fed, site), load_site_data(fed, site)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height (RGB, 8 bit): valid up to where a decoder would start."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def smears(tmp_path: Path) -> Path:
    """Two classes of eight real little PNGs each."""
    root = tmp_path / "smears"
    rng = np.random.default_rng(0)
    for label in ("A", "B"):
        (root / label).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def assert_skipped_everywhere(root: Path, needle: str, reason: str, caplog) -> None:
    """`leuk data check` lists the entry as skipped (no hang); scanning and the site's loading leave it
    out and log the skip."""
    result = run([*LEUK, "data", "check", str(root), "--json"])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert any(needle in entry and reason in entry for entry in report["skipped"]), report["skipped"]
    assert report["ok"] and report["num_images"] == 16 and not report["unreadable"]
    text = run([*LEUK, "data", "check", str(root)])
    assert text.returncode == 0 and "skipped     1" in text.stdout and reason in text.stdout, text.stderr
    manifest = scan_dataset(root)
    assert len(manifest) == 16 and len(manifest.digest()) == 64
    caplog.clear()
    classes, data = site_load(root)
    assert classes == ("A", "B") and len(data.train) + len(data.val) == 16
    assert reason in caplog.text  # the skip is logged


def test_fifo_named_like_an_image_is_skipped_without_hanging(smears: Path, caplog) -> None:
    os.mkfifo(smears / "A" / "waiting.jpg")
    assert_skipped_everywhere(smears, "A/waiting.jpg", "not a regular file", caplog)


def test_symlink_to_dev_zero_is_skipped(smears: Path, caplog) -> None:
    os.symlink("/dev/zero", smears / "B" / "endless.png")
    assert_skipped_everywhere(smears, "B/endless.png", "symlink leading out of the data folder", caplog)


def test_symlink_to_a_file_outside_the_folder_is_skipped(smears: Path, tmp_path: Path, caplog) -> None:
    outside = tmp_path / "elsewhere" / "secret.png"
    outside.parent.mkdir()
    Image.new("RGB", (20, 20), "red").save(outside)
    os.symlink(outside, smears / "A" / "looks-local.png")
    assert_skipped_everywhere(smears, "A/looks-local.png", "symlink leading out of the data folder", caplog)


def test_symlinked_class_folder_leading_out_is_skipped(smears: Path, tmp_path: Path, caplog) -> None:
    outside = tmp_path / "other-hospital" / "C"
    outside.mkdir(parents=True)
    Image.new("RGB", (20, 20), "red").save(outside / "x.png")
    os.symlink(outside, smears / "C")
    assert_skipped_everywhere(smears, "C/", "symlink leading out of the data folder", caplog)


def test_symlink_inside_the_folder_is_followed(smears: Path) -> None:
    os.symlink(smears / "A" / "0.png", smears / "B" / "alias.png")
    assert len(scan_dataset(smears)) == 17 and not check_dataset(smears)["skipped"]


def test_file_name_that_is_not_utf8_is_skipped(smears: Path, caplog) -> None:
    bad = os.path.join(os.fsencode(smears / "A"), b"\xff\xfe.jpg")
    with open(bad, "wb") as fh:
        Image.new("RGB", (20, 20), "blue").save(fh, format="JPEG")
    assert_skipped_everywhere(smears, "A/\\xff\\xfe.jpg", "not valid UTF-8", caplog)


def test_device_file_named_like_an_image_is_skipped(smears: Path, caplog) -> None:
    os.symlink("/dev/null", smears / "A" / "null.jpg")  # a device node needs root; a link to one does not
    assert "not a regular file" in load_image_error(smears / "A" / "null.jpg")
    assert_skipped_everywhere(smears, "A/null.jpg", "symlink leading out", caplog)


def load_image_error(path: Path) -> str:
    with pytest.raises(LeukError) as info:
        load_image(path)
    return str(info.value)


@pytest.mark.parametrize("width, height, reason", [
    (100_000, 100_000, "decompression-bomb limit"),  # Pillow refuses it while opening
    (8_000, 8_000, "over the limit of 50,000,000"),    # under Pillow's limit: leukfed's, from the header
])
def test_header_declaring_a_huge_image_is_refused_before_decoding(smears: Path, width: int, height: int,
                                                                  reason: str) -> None:
    bomb = smears / "A" / "bomb.png"
    bomb.write_bytes(png_header(width, height))
    message = load_image_error(bomb)
    assert reason in message and "\n" not in message
    report = json.loads(run([*LEUK, "data", "check", str(smears), "--json"]).stdout)
    assert report["unreadable"] == ["A/bomb.png"] and reason in report["unreadable_reasons"]["A/bomb.png"]
    assert not report["ok"]  # leuk-client refuses to join with it (its start checks are this report)
    with pytest.raises(LeukError, match=f"cannot read image .*bomb.png: .*{reason}"):
        site_load(smears)


def test_site_policy_may_lower_the_pixel_limit(smears: Path) -> None:
    assert check_dataset(smears, max_pixels=400)["ok"]  # 20 x 20 images
    report = check_dataset(smears, max_pixels=399)
    assert len(report["unreadable"]) == 16
    with pytest.raises(LeukError, match="over the limit of 399"):
        load_image(smears / "A" / "0.png", max_pixels=399)


def test_train_on_a_bomb_is_one_error_line(smears: Path, tmp_path: Path) -> None:
    (smears / "B" / "bomb.png").write_bytes(png_header(100_000, 100_000))
    os.mkfifo(smears / "A" / "waiting.png")
    result = run([*LEUK, "train", "--data", str(smears), "--out", str(tmp_path / "run"), "--model", "tinycnn",
                  "--image-size", "16", "--epochs", "1", "--device", "cpu"])
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2 and len(lines) == 1 and "B/bomb.png" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_data_check_streams_a_huge_file_instead_of_holding_it(smears: Path) -> None:
    """A 256 MiB file named like an image (a real PNG, then junk: sparse, so the disk holds little) is
    hashed and checked in pieces: eight threads over such files must not hold them whole."""
    import tracemalloc

    huge = smears / "A" / "huge.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(huge)
    with huge.open("r+b") as handle:
        handle.truncate(256 << 20)
    tracemalloc.start()
    try:
        report = check_dataset(smears)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["num_images"] == 17 and report["ok"], report["unreadable"]
    assert peak < 32 << 20, f"peak {peak >> 20} MiB"
