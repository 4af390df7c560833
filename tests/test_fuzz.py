"""Fuzzing: corrupted and random files and option combinations, from a seeded generator.

Every case must end in exit 0, 2 or 3 (the loaders: success or one :class:`InputError`
line), never a traceback, a hang or a partial output. Most cases call the loaders and
the CLI in-process (fast); a few run the command as a subprocess for the real exit codes.
"""

from __future__ import annotations

import io
import json
import random
import struct
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from gblr_compress.calibration import load_calib
from gblr_compress.checkpoint import load_model
from gblr_compress.cli import main
from gblr_compress.errors import InputError
from tests.cli_models import small_mlp

ROOT = Path(__file__).resolve().parents[1]
FACTORY = "tests.cli_models:small_mlp"
SEED = 18
CASE_SECONDS = 60.0  # a case taking longer counts as a hang

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- the valid seeds
@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of one valid file of each kind, which the generator corrupts."""
    d = tmp_path_factory.mktemp("seeds")
    torch.manual_seed(0)
    model = small_mlp().eval()
    calib = [torch.randn(8, 32) for _ in range(3)]
    torch.save(model, d / "module.pt")
    torch.save({"model": model, "calib": calib}, d / "bundle.pt")
    torch.save(model.state_dict(), d / "state.pt")
    save_file(model.state_dict(), str(d / "state.safetensors"))
    torch.save(calib, d / "calib.pt")
    np.savez(d / "calib.npz", x=torch.cat(calib).numpy())
    return {p.name: p.read_bytes() for p in d.iterdir()}


# --------------------------------------------------------------------- mutations
def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(0, len(data))]


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.choice([1, 2, 8, 64])):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _splice(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + rng.randbytes(rng.randrange(1, 64)) + data[i + rng.randrange(0, 64):]


def _random(rng: random.Random, _data: bytes) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 7, 100, 5000]))


MUTATIONS: list[Callable[[random.Random, bytes], bytes]] = [_truncate, _flip, _flip, _splice, _random]


def _pt_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _npz(arrays: dict[str, np.ndarray], allow_object: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in arrays.items():
            inner = io.BytesIO()
            np.lib.format.write_array(inner, v, allow_pickle=allow_object)
            zf.writestr(k + ".npy", inner.getvalue())
    return buf.getvalue()


def _npy_huge_header() -> bytes:
    # A valid .npy header declaring 10^12 float32 values, followed by 16 bytes.
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header = header + " " * (63 - (len(header) + 10) % 64) + "\n"
    raw = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + b"\0" * 16
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", raw)
    return buf.getvalue()


def _wrong_types(rng: random.Random) -> tuple[str, bytes]:
    """A valid container holding the wrong things."""
    choices: list[tuple[str, Callable[[], bytes]]] = [
        (".pt", lambda: _pt_bytes({"a": "text", "b": "more"})),
        (".pt", lambda: _pt_bytes([1, 2, 3])),
        (".pt", lambda: _pt_bytes({"model": "not a module"})),
        (".pt", lambda: _pt_bytes({"model": None, "calib": [torch.zeros(2)]})),
        (".pt", lambda: _pt_bytes([])),
        (".pt", lambda: _pt_bytes({})),
        (".pt", lambda: _pt_bytes(torch.tensor(3.0))),
        (".pt", lambda: _pt_bytes([torch.zeros(0, 32)])),
        (".pt", lambda: _pt_bytes([torch.zeros(4, 32, dtype=torch.complex64)])),
        (".pt", lambda: _pt_bytes([torch.ones(4, 32, dtype=torch.bool)])),
        (".pt", lambda: _pt_bytes([torch.ones(4, 32, dtype=torch.int64)])),
        (".pt", lambda: _pt_bytes({"x": [torch.zeros(3)]})),
        (".pt", lambda: _pt_bytes([{"x": torch.zeros(2, 32)}, torch.zeros(2, 32)])),
        (".pt", lambda: _pt_bytes({"fc1.weight": torch.zeros(3, 3)})),
        (".pt", lambda: _pt_bytes({"fc1.weight": "x", "fc2.bias": 1})),
        (".pt", lambda: _pt_bytes({"state_dict": {"fc1.weight": torch.zeros(64, 32)}, "epoch": 3})),
        (".pt", lambda: _pt_bytes([torch.zeros(1).expand(100_000, 100_000)])),  # 10^10 values, 4 bytes stored
        (".pt", lambda: _pt_bytes([torch.full((4, 32), float("nan"))])),
        (".safetensors", lambda: _safetensors_header({"fc1.weight": {"dtype": "F32", "shape": [64, 32],
                                                                       "data_offsets": [0, 8192]}})),
        (".safetensors", lambda: _safetensors_header({"fc1.weight": {"dtype": "F32", "shape": [10**9, 10**9],
                                                                       "data_offsets": [0, 16]}}, b"\0" * 16)),
        (".safetensors", lambda: _safetensors_header({"x": "bogus"})),
        (".safetensors", lambda: _safetensors_header({})),
        (".safetensors", lambda: struct.pack("<Q", 2**62) + b"{}"),
        (".safetensors", lambda: b"\xff" * 8 + b"not json"),
        (".npz", lambda: _npz({"x": np.array([{"a": 1}, None], dtype=object)}, allow_object=True)),
        (".npz", lambda: _npz({"x": np.array(["a", "b"])})),
        (".npz", lambda: _npz({})),
        (".npz", lambda: _npz({"x": np.zeros((0, 32), np.float32)})),
        (".npz", lambda: _npz({"arr_0": np.zeros((4, 32), np.float32), "arr_2": np.zeros(3)})),
        (".npz", lambda: _npz({"x": np.zeros((4, 32), np.float16)})),
        (".npz", lambda: _npz({"x": np.zeros((4, 32), np.uint16)})),
        (".npz", _npy_huge_header),
    ]
    suffix, make = rng.choice(choices)
    return suffix, make()


def _case_file(rng: random.Random, seeds: dict[str, bytes], folder: Path, index: int) -> tuple[Path, str]:
    """One fuzzed file, and the seed kind it came from (or ``"wrong"``)."""
    if rng.random() < 0.3:
        suffix, data = _wrong_types(rng)
        kind = "wrong"
    else:
        kind = rng.choice(sorted(seeds))
        data = rng.choice(MUTATIONS)(rng, seeds[kind])
        suffix = Path(kind).suffix
    path = folder / f"case{index}{suffix}"
    path.write_bytes(data)
    return path, kind


def _one_line(exc: InputError) -> None:
    text = str(exc)
    assert text and "\n" not in text.strip() and "Traceback" not in text, text


# ------------------------------------------------------------------------ loaders
def test_loaders_on_fuzzed_files(seeds, tmp_path, monkeypatch) -> None:
    """160 fuzzed files through every loader: success or one InputError line."""
    monkeypatch.chdir(ROOT)  # the factory is imported from the working directory
    rng = random.Random(SEED)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(160):
        path, _kind = _case_file(rng, seeds, tmp_path, i)
        loaders = [lambda p: load_calib(p)]
        if path.suffix != ".npz":
            loaders += [lambda p: load_model(p, FACTORY), lambda p: load_model(p)]
        for load in loaders:
            t0 = time.perf_counter()
            try:
                load(path)
                outcomes["ok"] += 1
            except InputError as exc:
                _one_line(exc)
                outcomes["refused"] += 1
            assert time.perf_counter() - t0 < CASE_SECONDS, path
    assert outcomes["refused"] > 100 and outcomes["ok"] > 0, outcomes


def test_report_loader_on_fuzzed_reports(tmp_path) -> None:
    """40 fuzzed report files for ``inspect``: exit 0 or 2, one line on errors."""
    rng = random.Random(SEED + 1)
    base = {"version": 1, "layers": [{"name": "fc", "in_features": 4, "out_features": 3, "status": "skipped",
                                      "dense_cost": 12}], "settings": {"budget": 0.5}, "notes": [], "gate": None}
    text = json.dumps(base)
    codes = set()
    for i in range(40):
        choice = rng.randrange(4)
        if choice == 0:
            data = text[: rng.randrange(len(text))]
        elif choice == 1:
            d = json.loads(text)
            key = rng.choice(["layers", "settings", "notes", "gate", "version", "quality", "seconds"])
            d[key] = rng.choice([None, 3, "x", [1], {"a": 1}, [{"name": 5}], float("inf")])
            data = json.dumps(d)
        elif choice == 2:
            d = json.loads(text)
            layer = d["layers"][0]
            layer[rng.choice(sorted(layer) + ["note", "structure", "sensitivity"])] = rng.choice(
                [None, -1, "abc", [], {}, 1e300, True])
            data = json.dumps(d)
        else:
            data = rng.randbytes(rng.randrange(0, 300)).decode("latin-1")
        path = tmp_path / f"r{i}.json"
        path.write_text(data, encoding="latin-1")
        result = CliRunner().invoke(main, ["inspect", str(path), "--no-heatmap"])
        assert result.exit_code in (0, 2) and "Traceback" not in result.output, (data, result.output)
        if result.exit_code == 2:
            errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, result.output
        codes.add(result.exit_code)
    assert codes == {0, 2}


# --------------------------------------------------------------------------- CLI
_OPTIONS: list[tuple[str, list[str | None]]] = [
    ("--budget", ["0.3", "0.05", "1", "0", "-1", "1.5", "nan", "abc"]),
    ("--steps", ["0", "1", "2", "-1", "x"]),
    ("--max-blocks", ["1", "4", "0"]),
    ("--lr", ["1e-3", "0", "-1"]),
    ("--augment", [None, "0", "0.5", "1"]),
    ("--loss", [None, "mse", "kl", "foo"]),
    ("--include", [None, "fc*", "nothing*"]),
    ("--exclude", [None, "fc3", "*"]),
    ("--time-budget", [None, "0", "0.001", "30"]),
    ("--min-fidelity", [None, "-0.5", "0.0", "0.9999", "2"]),
    ("--max-memory", [None, "1e-6", "64"]),
    ("--opset", [None, "17", "18"]),
    ("--teacher-cache-mb", [None, "0", "-3"]),
    ("--seed", [None, "7", "-1"]),
]
_FLAGS = ["--data-free", "--no-verify", "--force", "--compress-tied", "--json", "--deterministic"]


def _cli_case(rng: random.Random, seeds: dict[str, bytes], folder: Path, index: int) -> list[str]:
    if rng.random() < 0.4:
        path, kind = _case_file(rng, seeds, folder, index)  # a fuzzed model file
    else:
        kind = rng.choice(["module.pt", "bundle.pt", "state.safetensors"])
        path = folder / f"case{index}{Path(kind).suffix}"
        path.write_bytes(seeds[kind])
    args = [str(path)]
    if path.suffix == ".safetensors" or kind == "state.pt" or rng.random() < 0.1:
        args += ["--factory", FACTORY]
    data = rng.choice(["calib", "npz", "spec", "badspec", "none", "fuzzed"])
    if data in ("calib", "npz"):
        calib = folder / f"calib{index}.{'pt' if data == 'calib' else 'npz'}"
        calib.write_bytes(seeds["calib.pt" if data == "calib" else "calib.npz"])
        args += ["--calib", str(calib)]
    elif data == "spec":
        args += ["--input-spec", rng.choice(["float32[4,32]", "x:float32[4,32]", "float16[2,32]"])]
    elif data == "badspec":
        args += ["--input-spec", rng.choice(["float32[4,31]", "int64[4,32]", "float32[0,32]", "q[", ""])]
    elif data == "fuzzed":
        calib, _ = _case_file(rng, seeds, folder, 1000 + index)
        args += ["--calib", str(calib)]
    for flag, values in rng.sample(_OPTIONS, rng.randrange(1, 5)):
        value = rng.choice(values)
        if value is not None:
            args += [flag, value]
    if "--budget" not in args:
        args += ["--budget", "0.3"]
    if "--steps" not in args:
        args += ["--steps", "1"]
    args += rng.sample(_FLAGS, rng.randrange(0, 3))
    return args


def _check_outputs(out_dir: Path, code: int) -> None:
    names = sorted(p.name for p in out_dir.iterdir())
    if code == 0:
        assert names == ["m.onnx", "m.report.json"], names
    else:
        assert names == [], names  # nothing written, no temporary file left
    for p in out_dir.iterdir():
        p.unlink()


def test_cli_on_fuzzed_files_and_option_combinations(seeds, tmp_path, monkeypatch) -> None:
    """40 in-process runs: exit 0, 2 or 3; one error line; outputs whole or absent."""
    monkeypatch.chdir(ROOT)
    rng = random.Random(SEED + 2)
    inputs, out_dir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out_dir.mkdir()
    codes = []
    for i in range(40):
        args = [*_cli_case(rng, seeds, inputs, i), "-o", str(out_dir / "m.onnx"), "--trust-checkpoint"]
        t0 = time.perf_counter()
        result = CliRunner().invoke(main, args)
        assert time.perf_counter() - t0 < CASE_SECONDS, args
        assert result.exit_code in (0, 2, 3), (args, result.output, result.exception)
        assert "Traceback" not in result.output and "internal error" not in result.output, (args, result.output)
        if result.exit_code != 0:
            errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1, (args, result.output)
        _check_outputs(out_dir, result.exit_code)
        codes.append(result.exit_code)
    assert {0, 2} <= set(codes), codes


def test_fuzzed_subprocess_runs_exit_with_the_documented_codes(seeds, tmp_path) -> None:
    """Real processes: a valid run (0), a corrupted checkpoint (2), a failed gate (3)."""
    files = {k: tmp_path / k for k in ("state.safetensors", "calib.pt")}
    for name, path in files.items():
        path.write_bytes(seeds[name])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(_flip(random.Random(SEED), seeds["state.safetensors"])[:300])
    base = [sys.executable, "-m", "gblr_compress"]
    common = ["--factory", FACTORY, "--calib", str(files["calib.pt"]), "--steps", "0", "--budget", "0.2", "--quiet"]
    cases = [
        ([str(files["state.safetensors"]), *common], 0),
        ([str(broken), *common], 2),
        ([str(files["state.safetensors"]), *common, "--min-fidelity", "0.99999"], 3),
    ]
    for args, expected in cases:
        out_dir = tmp_path / f"out{expected}"
        out_dir.mkdir()
        proc = subprocess.run([*base, *args, "-o", str(out_dir / "m.onnx")], cwd=ROOT, capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=300)
        assert proc.returncode == expected, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        if expected:
            assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
        _check_outputs(out_dir, proc.returncode)
