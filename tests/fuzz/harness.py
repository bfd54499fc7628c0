"""Fuzzing harness for the ingest path (``edge.ingest.load_study``), driven by Hypothesis.

Why Hypothesis rather than a bare random loop: every input is drawn from a strategy, so when
one breaks the oracle Hypothesis shrinks it to the smallest mutation that still does (one
byte, one length), which is what an engineer needs to fix it. Why structure-aware mutations:
random bytes mostly fail the DICM check; the interesting inputs change a *length*, a *VR*, a
*tag* or the *transfer syntax* of an otherwise valid file, so the mutator knows where those
are in each seed (``landmarks``) and writes the values that break parsers (0, 1, 0xFFFF,
0xFFFFFFFF, ...) there, besides flips, inserts, deletes, duplicated ranges, splices from other
seeds and truncation. A random sidecar JSON rides along now and then (it is read by
``load_study`` too).

Oracle, for every input: ``load_study`` returns a Study whose pixels have the header's shape,
or raises ``IngestRejected`` with a non-empty one-line reason and a rule name - in at most
``per_input_s`` seconds. Anything else (another exception, a hang) is a finding; the shrunk
input is written to ``--crashes``.

Seeds are cohort files (``cohort.generate.simulate``: uncompressed, JPEG 2000 lossless and
lossy, CR and DX, MONOCHROME1/2) rendered small, plus an implicit-VR copy and a copy with a
VOI LUT, all made afresh (the cohort is a pure function of its seed), so nothing binary is
kept in the repository. ``min_side`` is lowered so the small seeds reach the decoders.

    .venv/bin/python tests/fuzz/harness.py --seconds 3600      # the documented long run
    python tests/fuzz/harness.py --engine atheris --seconds 600  # coverage-guided, if installed
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import resource
import signal
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.facts import sidecar_path
from edge.ingest import IngestRejected, load_study
from osteofy.config import IngestConfig

__all__ = [
    "FUZZ_CONFIG",
    "Seed",
    "Stats",
    "check",
    "fuzz",
    "fuzz_with_atheris",
    "load_seeds",
    "make_corpus",
    "target",
]

FUZZ_CONFIG = IngestConfig(min_side=32)
SITES = frozenset({"hand", "hip"})
INTERESTING = (0, 1, 2, 3, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF,
               0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFFFFFF)  # fmt: skip
VRS = (b"OB", b"OW", b"SQ", b"UN", b"UT", b"US", b"UL", b"DS", b"CS", b"LO", b"PN", b"UI",
       b"AT", b"OF", b"OD", b"FD", b"\x00\x00", b"ZZ")  # fmt: skip
TAGS = ((0x7FE0, 0x0010), (0xFFFE, 0xE000), (0xFFFE, 0xE00D), (0xFFFE, 0xE0DD),
        (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0100), (0x0002, 0x0010),
        (0x0028, 0x3010), (0x0008, 0x0060), (0x0018, 0x0015))  # fmt: skip
SYNTAXES = (b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2",
            b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.91", b"1.2.840.10008.1.2.4.70",
            b"1.2.840.10008.1.2.4.57", b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.4.50",
            b"1.2.840.10008.1.2.5", b"1.2.840.10008.1.2.1.99", b"")  # fmt: skip
_LONG = {b"OB", b"OW", b"OD", b"OF", b"OL", b"OV", b"SQ", b"UC", b"UN", b"UR", b"UT"}


# --- seeds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    """A valid file and where its structure lies (offsets into ``data``)."""

    name: str
    data: bytes
    lengths: tuple[tuple[int, int], ...]  # (offset, width) of element and item length fields
    vrs: tuple[int, ...]  # offsets of explicit VR codes
    tags: tuple[int, ...]  # offsets of element tags
    shorts: tuple[int, ...]  # offsets of US values (Rows, Columns, Bits ...)
    ts_value: tuple[int, int] | None  # (offset, length) of the Transfer Syntax UID value
    header_end: int  # the Pixel Data element's offset: most parsing happens before it


def _walk(name: str, data: bytes) -> Seed:
    """Landmarks of an explicit-VR little-endian file (the meta, and data sets written so)."""
    lengths: list[tuple[int, int]] = []
    vrs: list[int] = []
    tags: list[int] = []
    shorts: list[int] = []
    ts_value = None
    header_end = len(data)
    pos = 132
    implicit = False
    while pos + 8 <= len(data):
        group, elem = struct.unpack("<HH", data[pos : pos + 4])
        tags.append(pos)
        if group == 0xFFFE:  # item / delimiters: tag + 4-byte length, no VR
            lengths.append((pos + 4, 4))
            (length,) = struct.unpack("<I", data[pos + 4 : pos + 8])
            in_pixels = pos > header_end
            pos += 8 + (length if elem == 0xE000 and in_pixels and length != 0xFFFFFFFF else 0)
            continue
        if group != 0x0002 and implicit:
            break  # an implicit-VR data set: the meta's landmarks are enough
        vr = data[pos + 4 : pos + 6]
        vrs.append(pos + 4)
        if vr in _LONG:
            lengths.append((pos + 8, 4))
            (length,) = struct.unpack("<I", data[pos + 8 : pos + 12])
            start = pos + 12
        else:
            lengths.append((pos + 6, 2))
            (length,) = struct.unpack("<H", data[pos + 6 : pos + 8])
            start = pos + 8
        if (group, elem) == (0x0002, 0x0010):
            ts_value = (start, length)
            implicit = data[start : start + length].rstrip(b"\x00") == SYNTAXES[0]
        if vr == b"US" and length == 2:
            shorts.append(start)
        if (group, elem) == (0x7FE0, 0x0010):
            header_end = pos
        # step into sequences and encapsulated pixel data; over any other value
        pos = start if vr == b"SQ" or length == 0xFFFFFFFF else start + length
    return Seed(name, data, tuple(lengths), tuple(vrs), tuple(tags), tuple(shorts), ts_value,
                header_end)  # fmt: skip


def make_corpus(directory: Path) -> list[Path]:
    """Render the seed corpus into ``directory`` (deterministic: same files every time)."""
    import pydicom
    from pydicom.uid import ImplicitVRLittleEndian

    from cohort.generate import SimulateOptions, simulate

    directory.mkdir(parents=True, exist_ok=True)
    for site, n, seed, compression in (("hand", 4, 31, "auto"), ("hip", 2, 32, "j2k")):
        opts = SimulateOptions(max_side=160, counterfactual=False, compression=compression)
        simulate(directory / f"{site}-{compression}", site, n, seed, options=opts, progress=False)
    files = sorted(directory.glob("*/*.dcm"))
    native = next(
        p for p in files if not pydicom.dcmread(p).file_meta.TransferSyntaxUID.is_compressed
    )
    ds = pydicom.dcmread(native)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(directory / "implicit-vr.dcm", enforce_file_format=True)
    ds = pydicom.dcmread(native)
    item = pydicom.Dataset()
    bits = int(ds.BitsStored)
    item.LUTDescriptor = [256, 0, 16]
    item.add_new(0x00283006, "OW", np.linspace(0, 65535, 256).astype("<u2").tobytes())  # LUT Data
    item.LUTExplanation = "FUZZ SEED"
    ds.VOILUTSequence = pydicom.Sequence([item])
    ds.BitsStored, ds.HighBit = bits, bits - 1
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(directory / "voi-lut.dcm", enforce_file_format=True)
    return sorted([*files, directory / "implicit-vr.dcm", directory / "voi-lut.dcm"])


def load_seeds(paths: list[Path]) -> list[Seed]:
    return [_walk(path.name, path.read_bytes()) for path in paths]


# --- mutation ------------------------------------------------------------------------------


@st.composite
def mutants(draw: st.DrawFn, seeds: list[Seed]) -> bytes:
    """A seed with 1-6 structure-aware mutations (see the module docstring)."""
    seed = draw(st.sampled_from(seeds), label="seed")
    buf = bytearray(seed.data)
    for _ in range(draw(st.integers(1, 6), label="mutations")):
        size = len(buf)
        if size < 2:
            break
        anywhere = st.integers(0, size - 1)
        where = st.one_of(st.integers(0, min(seed.header_end, size - 1)), anywhere)
        op = draw(st.sampled_from(("length", "length", "vr", "tag", "short", "syntax", "byte",
                                   "flip", "insert", "delete", "duplicate", "splice",
                                   "truncate")))  # fmt: skip
        if op == "length" and seed.lengths:
            at, width = draw(st.sampled_from(seed.lengths))
            old = int.from_bytes(buf[at : at + width], "little")
            value = draw(st.sampled_from((*INTERESTING, old + 1, old - 1, old * 2, old // 2)))
            buf[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif op == "vr" and seed.vrs:
            at = draw(st.sampled_from(seed.vrs))
            buf[at : at + 2] = draw(st.sampled_from(VRS))
        elif op == "tag" and seed.tags:
            at = draw(st.sampled_from(seed.tags))
            buf[at : at + 4] = struct.pack("<HH", *draw(st.sampled_from(TAGS)))
        elif op == "short" and seed.shorts:
            at = draw(st.sampled_from(seed.shorts))
            value = draw(st.sampled_from(INTERESTING)) & 0xFFFF
            buf[at : at + 2] = struct.pack("<H", value)
        elif op == "syntax" and seed.ts_value is not None:
            at, length = seed.ts_value
            uid = draw(st.sampled_from(SYNTAXES))
            buf[at : at + length] = (uid + b"\x00" * length)[:length]
        elif op == "byte":
            buf[min(draw(where), size - 1)] = draw(st.integers(0, 255))
        elif op == "flip":
            pos = min(draw(where), size - 1)
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[draw(where) : draw(where)] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            start = draw(where)
            del buf[start : start + draw(st.integers(1, 64))]
        elif op == "duplicate":
            start = draw(where)
            chunk = bytes(buf[start : start + draw(st.integers(1, 256))])
            at = draw(where)
            buf[at:at] = chunk
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other.data) - 1))
            chunk = other.data[start : start + draw(st.integers(1, 4096))]
            at = draw(where)
            buf[at : at + len(chunk)] = chunk
        elif op == "truncate":
            del buf[draw(anywhere) :]
    return bytes(buf)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=8,
)
_FACTS = st.sampled_from(("age_years", "sex", "sex_male", "weight_kg", "height_m", "smoking",
                          "prior_fracture", "bmi", "alcohol", "x"))  # fmt: skip
SIDECARS = st.one_of(
    st.none(),
    st.dictionaries(_FACTS, _JSON, max_size=4).map(json.dumps),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
)


# --- oracle and runner -----------------------------------------------------------------------


class InputTimeout(Exception):
    """One input took longer than ``per_input_s``: a hang is a finding too."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise InputTimeout(f"an input took more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(path: Path, data: bytes, sidecar: str | None, cfg: IngestConfig = FUZZ_CONFIG) -> str:
    """Write the input, run ``load_study``, apply the oracle; returns the outcome's label."""
    path.write_bytes(data)
    side = sidecar_path(path)
    if sidecar is None:
        side.unlink(missing_ok=True)
    else:
        side.write_text(sidecar, encoding="latin-1")
    try:
        study = load_study(path, cfg, SITES)
    except IngestRejected as exc:
        reason = str(exc)
        assert reason and "\n" not in reason, f"bad reason {reason!r}"
        assert exc.rule and exc.rule.replace("_", "").isalpha(), f"bad rule {exc.rule!r}"
        return exc.rule
    pixels = study.raw.pixels
    assert pixels.shape == (study.header.rows, study.header.cols), "shape differs from header"
    assert study.site in SITES
    return "accepted"


@dataclass
class Stats:
    inputs: int = 0
    seconds: float = 0.0
    slowest_s: float = 0.0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    failure: bytes | None = None
    peak_rss_mib: float = 0.0

    def summary(self) -> str:
        top = ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common())
        rate = self.inputs / max(self.seconds, 1e-9)
        return (
            f"{self.inputs} inputs in {self.seconds:.1f} s ({rate:.0f}/s), "
            f"slowest {self.slowest_s * 1000:.0f} ms, peak RSS {self.peak_rss_mib:.0f} MiB, "
            f"uncaught exceptions {0 if self.failure is None else 1}; outcomes: {top}"
        )


def target(
    seeds: list[Seed],
    workdir: Path,
    stats: Stats,
    *,
    batch: int = 200,
    per_input_s: float = 30.0,
    cfg: IngestConfig = FUZZ_CONFIG,
) -> Any:
    """The Hypothesis test: one mutant (and maybe a sidecar) through the oracle per call."""
    path = workdir / "input.dcm"

    @settings(
        max_examples=batch,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=mutants(seeds), sidecar=SIDECARS)
    def one(data: bytes, sidecar: str | None) -> None:
        t0 = time.perf_counter()
        try:
            with _time_limit(per_input_s), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                outcome = check(path, data, sidecar, cfg)
        except BaseException:
            stats.failure = data
            raise
        stats.slowest_s = max(stats.slowest_s, time.perf_counter() - t0)
        stats.inputs += 1
        stats.outcomes[outcome] += 1

    return one


def fuzz(
    seeds: list[Seed],
    workdir: Path,
    *,
    examples: int | None = None,
    seconds: float | None = None,
    batch: int = 200,
    per_input_s: float = 30.0,
    crashes: Path | None = None,
    cfg: IngestConfig = FUZZ_CONFIG,
) -> Stats:
    """Run until ``examples`` inputs or ``seconds`` have passed; raises on the first finding
    (after Hypothesis has shrunk it, and after writing it to ``crashes``)."""
    stats = Stats()
    one = target(seeds, workdir, stats, batch=batch, per_input_s=per_input_s, cfg=cfg)
    started = time.monotonic()
    try:
        while True:
            done = (examples is not None and stats.inputs >= examples) or (
                seconds is not None and time.monotonic() - started >= seconds
            )
            if done:
                break
            one()
    except BaseException:
        if crashes is not None and stats.failure is not None:
            crashes.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha256(stats.failure).hexdigest()[:16]
            (crashes / f"crash-{name}.dcm").write_bytes(stats.failure)
        raise
    finally:
        stats.seconds = time.monotonic() - started
        stats.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return stats


def fuzz_with_atheris(
    seeds: list[Seed], workdir: Path, seconds: float, crashes: Path, per_input_s: float
) -> None:
    """Coverage-guided: libFuzzer (atheris) drives the same Hypothesis strategy.

    libFuzzer's bytes become Hypothesis's choices (``fuzz_one_input``), so coverage feedback
    steers *which* structure-aware mutations are made. Needs ``pip install atheris`` (a wheel
    exists for CPython 3.11 on x86-64 Linux; it is not a project dependency). Never returns:
    libFuzzer exits the process, printing its figures (runs, exec/s, coverage).
    """
    import atheris  # type: ignore[import-not-found]

    stats = Stats()
    one = target(seeds, workdir, stats, per_input_s=0.0)  # libFuzzer's -timeout owns hangs
    corpus = workdir / "atheris-corpus"
    corpus.mkdir()
    crashes.mkdir(parents=True, exist_ok=True)
    atheris.instrument_all()
    argv = [sys.argv[0], f"-max_total_time={int(seconds)}", f"-timeout={int(per_input_s)}",
            "-rss_limit_mb=2048", f"-artifact_prefix={crashes}/", "-print_final_stats=1",
            str(corpus)]  # fmt: skip
    atheris.Setup(argv, one.hypothesis.fuzz_one_input)
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to run")
    parser.add_argument("--corpus", type=Path, help="seed folder (default: render into a temp dir)")
    parser.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--per-input-s", type=float, default=30.0)
    parser.add_argument("--engine", choices=("hypothesis", "atheris"), default="hypothesis")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="osteofy-fuzz-") as tmp:
        corpus = args.corpus or Path(tmp) / "corpus"
        paths = sorted(corpus.glob("**/*.dcm")) if args.corpus else make_corpus(corpus)
        seeds = load_seeds(paths)
        for path in paths:  # a seed the ingest refuses would fuzz only the refusal
            assert check(Path(tmp) / "seed.dcm", path.read_bytes(), None) == "accepted", path
        print(f"{len(seeds)} seeds; fuzzing load_study for {args.seconds:g} s", flush=True)
        if args.engine == "atheris":
            fuzz_with_atheris(seeds, Path(tmp), args.seconds, args.crashes, args.per_input_s)
        try:
            stats = fuzz(seeds, Path(tmp), seconds=args.seconds, per_input_s=args.per_input_s,
                         crashes=args.crashes)  # fmt: skip
        except Exception as exc:  # a finding: say what and where the input went
            print(f"FINDING: {type(exc).__name__}: {exc} (input in {args.crashes})")
            return 1
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
