"""Long fuzzing runs of the targets CI fuzzes briefly: every decoder and stateful core of
``tests/fuzz_targets.py``, each for ``--seconds``, with atheris (coverage-guided libFuzzer;
``pip install -e '.[fuzz]'``) or hypothesis (``--engine hypothesis``: random and mutated
inputs, the strategies of ``tests/test_fuzz.py``, in batches until the time is up).

Usage (from the repo root)::

    python3 bench/fuzz_long.py [--engine atheris|hypothesis] [--seconds 60] [--repeats 1]
                               [--targets pipeline.wire.stun.parse,control.core] [--list]

Each target runs in a child process of its own (atheris instruments the ``pipeline`` modules
as the child imports them; a libFuzzer run ends its process). The contracts are the CI's:
a decoder returns or raises only its documented errors; a core raises nothing, counts every
input, and still serves a valid input after junk (checked after every input). A breach is a
finding: counted per distinct kind and place, and the first input of each saved under
``bench/results/fuzz-<timestamp>/<target>/`` (the input's bytes; for a core, its inputs
joined by ``SPLIT``). Findings do not stop a run.

The table gives per target the inputs run (median over ``--repeats``), inputs/s, and the
distinct findings over all repeats, then the machine's load average: the figures are
throughput on a shared machine, nothing more.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests import each other as pytest lets them

SPLIT = b"\xfe\xed"
"""A core's input is its inputs joined by these two bytes (at most ``MAX_INPUTS``)."""
MAX_INPUTS = 8


# -- the child: one target ---------------------------------------------------------------------


class Run:
    """One target's contract, counters and findings."""

    def __init__(self, name: str, out: Path) -> None:
        from tests.fuzz_targets import DECODERS, STATEFUL

        self.name = name
        self.decoder = DECODERS.get(name)
        self.stateful = STATEFUL.get(name)
        if self.decoder is None and self.stateful is None:
            raise SystemExit(f"no target {name!r} (--list)")
        self.out = out
        self.inputs = 0
        self.findings: dict[str, dict[str, Any]] = {}
        self.started = time.monotonic()
        self._written = 0.0

    @property
    def seeds(self) -> tuple[bytes, ...]:
        target = self.decoder or self.stateful
        assert target is not None
        return target.seeds

    def one(self, data: bytes) -> None:
        self.inputs += 1
        try:
            if self.decoder is not None:
                self._decode(data)
            else:
                self._feed(data)
        except Exception as exc:  # a finding: anything outside the contract
            self._found(exc, data)
        now = time.monotonic()
        if now - self._written > 1.0:
            self.write()
            self._written = now

    def _decode(self, data: bytes) -> None:
        from pipeline.errors import RemoteProtocolError

        assert self.decoder is not None
        for call in self.decoder.calls:
            try:
                call(data)
            except self.decoder.errors as exc:
                if isinstance(exc, RemoteProtocolError) and not exc.reason.isidentifier():
                    raise AssertionError(f"reason {exc.reason!r}") from exc

    def _feed(self, data: bytes) -> None:
        target = self.stateful
        assert target is not None
        state = target.make()
        for item in data.split(SPLIT)[:MAX_INPUTS]:
            before = target.tally(state)
            target.feed(state, item)
            if target.tally(state) - before < target.per_input:
                raise AssertionError("an input left no count")
        target.works(state)

    def _found(self, exc: BaseException, data: bytes) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        place = next(
            (f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames)),
            "?",
        )
        key = f"{type(exc).__name__} at {place}"
        finding = self.findings.get(key)
        if finding is None:
            digest = hashlib.sha1(data).hexdigest()[:12]
            path = self.out / f"{digest}.bin"
            path.write_bytes(data)
            finding = {"kind": key, "message": str(exc)[:200], "input": str(path), "count": 0}
            self.findings[key] = finding
        finding["count"] += 1

    def write(self) -> None:
        summary = {
            "target": self.name,
            "inputs": self.inputs,
            "seconds": time.monotonic() - self.started,
            "findings": list(self.findings.values()),
        }
        (self.out / "summary.json").write_text(json.dumps(summary))


def child_atheris(run: Run, seconds: float) -> None:
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix="corpus-", dir=run.out))
    for i, seed in enumerate(run.seeds):
        (corpus / f"seed{i}").write_bytes(seed)
    max_len = 4096 if run.stateful is not None else 2048
    atheris.Setup(
        [sys.argv[0], f"-max_total_time={int(seconds)}", f"-max_len={max_len}", str(corpus)],
        run.one,
    )
    try:
        atheris.Fuzz()
    finally:
        run.write()


def child_hypothesis(run: Run, seconds: float) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from tests.test_fuzz import junk

    target = run.decoder or run.stateful
    assert target is not None
    inputs: Any = junk(target.seeds, target.max_size)
    if run.stateful is not None:
        inputs = st.lists(inputs, max_size=MAX_INPUTS).map(SPLIT.join)

    @settings(
        max_examples=1000,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def batch(data: bytes) -> None:
        run.one(data)

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        batch()
    run.write()


# -- the parent: every target, a table ---------------------------------------------------------


def run_target(name: str, engine: str, seconds: float, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", name, "--engine", engine]
    command += ["--seconds", str(seconds), "--out", str(out)]
    log = out / "child.log"
    with log.open("w") as sink:
        subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, timeout=seconds + 120)
    summary_path = out / "summary.json"
    if not summary_path.exists():
        return {"target": name, "inputs": 0, "seconds": seconds, "findings": [], "error": str(log)}
    summary: dict[str, Any] = json.loads(summary_path.read_text())
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=["atheris", "hypothesis"], default=None)
    parser.add_argument("--seconds", type=float, default=60.0, help="per target and repeat")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--targets", default="", help="comma-separated names (default: all)")
    parser.add_argument("--list", action="store_true", help="print the target names")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "hypothesis"
            print("atheris is not installed: --engine hypothesis", file=sys.stderr)

    if args.child is not None:
        if engine == "atheris":  # coverage for libFuzzer: pipeline's modules, as imported
            import atheris

            with atheris.instrument_imports(include=["pipeline"]):
                import tests.fuzz_targets  # noqa: F401
        run = Run(args.child, Path(args.out))
        (child_atheris if engine == "atheris" else child_hypothesis)(run, args.seconds)
        return

    from tests.fuzz_targets import DECODERS, STATEFUL

    names = [n for n in args.targets.split(",") if n] or [*DECODERS, *STATEFUL]
    if args.list:
        print("\n".join(names))
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results" / f"fuzz-{stamp}"
    rows = []
    total_findings = 0
    for name in names:
        runs = [
            run_target(name, engine, args.seconds, results / name / f"r{r}")
            for r in range(args.repeats)
        ]
        inputs = statistics.median(r["inputs"] for r in runs)
        rate = statistics.median(r["inputs"] / max(r["seconds"], 1e-9) for r in runs)
        kinds = {f["kind"]: f for r in runs for f in r["findings"]}
        errors = [r["error"] for r in runs if "error" in r]
        total_findings += len(kinds)
        rows.append((name, inputs, rate, kinds, errors))
        print(
            f"{name:<55} {inputs:>10.0f} {rate:>9.0f}/s  findings {len(kinds)}"
            + (f"  (child failed: {errors[0]})" if errors else ""),
            file=sys.stderr,
        )
    print(f"\nengine {engine}, {args.seconds:g} s per target, repeats {args.repeats}")
    print(f"{'target':<55} {'inputs':>10} {'inputs/s':>9} {'findings':>8}")
    for name, inputs, rate, kinds, errors in rows:
        note = "  child failed" if errors else ""
        print(f"{name:<55} {inputs:>10.0f} {rate:>9.0f} {len(kinds):>8}{note}")
        for kind, finding in kinds.items():
            print(f"    {finding['count']}x {kind}: {finding['message']} -> {finding['input']}")
    print(f"distinct findings: {total_findings}; results in {results}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
