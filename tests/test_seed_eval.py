"""bench/seed_eval.py's pure parts (no namespaces): the seed's normalisations, the TCP_RR
client and server on loopback, the fixed-work load, the shape of the JSON and its table,
and the script's --help and --plot."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bench import router_bench, seed_eval, seed_tools

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "seed_eval.py"


def medians(bw_alone: float, bw_load: float, score: float, tps: float) -> dict[str, Any]:
    return {
        "bw_alone": bw_alone,
        "bw_load": bw_load,
        "score_stream": score,
        "tps_alone": tps,
        "tps_load": tps / 2,
        "score_rr": score,
    }


# -- the seed's normalisations -----------------------------------------------------------------


def test_normalise_is_measured_over_max_summed() -> None:
    found = {
        "interface": {"10 Mbit/s": medians(9.0, 8.0, 500.0, 400.0)},
        "router": {"10 Mbit/s": medians(9.5, 9.0, 900.0, 300.0)},
    }
    out = seed_eval.normalise(found, {"interface": 1000.0, "router": 800.0})
    i, r = out["interface"]["10 Mbit/s"], out["router"]["10 Mbit/s"]
    # max bw at 10 Mbit/s is the router's 9.5 (alone); max score the interface's idle 1000
    assert i["bandwidth"]["bw"] == pytest.approx(8.0 / 9.5)
    assert i["bandwidth"]["score"] == pytest.approx(0.5)
    assert i["bandwidth"]["sum"] == pytest.approx(8.0 / 9.5 + 0.5)
    assert r["bandwidth"]["sum"] == pytest.approx(9.0 / 9.5 + 0.9)
    # max tps: the interface's 400 alone; with load the interface did 200, the router 150
    assert i["latency"]["tps"] == pytest.approx(0.5)
    assert r["latency"]["sum"] == pytest.approx(150 / 400 + 0.9)


def test_normalise_takes_max_per_limit_and_survives_missing_figures() -> None:
    found = {
        "interface": {
            "unlimited": medians(200.0, 100.0, 500.0, 300.0),
            "10 Mbit/s": {**medians(9.0, 9.0, 500.0, 300.0), "bw_load": None},
        },
    }
    out = seed_eval.normalise(found, {"interface": None})
    assert out["interface"]["unlimited"]["bandwidth"]["bw"] == pytest.approx(0.5)
    assert out["interface"]["10 Mbit/s"]["bandwidth"] == {"bw": None, "score": 1.0, "sum": None}
    assert seed_eval.normalise({}, {}) == {}


# -- the TCP_RR and the load -------------------------------------------------------------------


def test_rr_client_and_server_on_loopback() -> None:
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        server = threading.Thread(target=seed_tools.serve_rr, args=(listener, stop), daemon=True)
        server.start()
        try:
            first = seed_tools.rr_transactions("127.0.0.1", port, 0.3)
            second = seed_tools.rr_transactions("127.0.0.1", port, 0.3)  # a new connection
        finally:
            stop.set()
            server.join(5)
    assert first.transactions > 50 and second.transactions > 50
    assert first.seconds >= 0.3
    assert first.tps == pytest.approx(first.transactions / first.seconds)
    assert not server.is_alive()


def test_rr_client_refused_is_an_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening
        with pytest.raises(ConnectionRefusedError):
            seed_tools.rr_transactions("127.0.0.1", port, 0.1)


def test_load_is_fixed_work() -> None:
    assert seed_tools.work_unit() == seed_tools.work_unit() == 420497
    ops, seconds = seed_tools.run_load(0.2)
    assert ops > 0 and seconds >= 0.2
    assert seed_tools.load_report(10, 2.0) == {"ops": 10, "seconds": 2.0, "ops_s": 5.0}


def test_load_process_answers_go_lines() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "seed_tools.py"), "load"],
        input="go 0.1\nbogus\n",
        capture_output=True,
        text=True,
        timeout=30,
    )
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == "ready"
    assert json.loads(lines[1])["ops_s"] > 0
    assert "bad command" in json.loads(lines[2])["error"]


# -- the JSON, the table, the script -----------------------------------------------------------


def result() -> dict[str, Any]:
    """A result as ``run`` makes it, from made-up cells."""
    labels = ["unlimited", "10 Mbit/s"]
    cells = {}
    for mode, score in (("interface", 800.0), ("router", 900.0)):
        cells[mode] = {}
        for label, bw in zip(labels, (150.0, 9.0), strict=True):
            c = seed_eval.Cell()
            for kind, v in zip(
                seed_eval.KINDS, (bw, bw * 0.9, score, 300, 250, score), strict=True
            ):
                c.runs[kind] += [v, v * 1.1, v * 0.9]
            c.vpn_cpu_s += [1.0, 1.2, 0.8]
            c.others_cores += [0.1, 0.2, 0.3]
            cells[mode][label] = c
    summary = router_bench.Cell("a", "b").summary()
    paths = {m: {"host": summary, "virtual": summary} for m in cells}
    return {
        "timestamp": "20260101-000000",
        "machine": {"nproc": 2, "kernel": "k", "python": "3", "loadavg": 0.5},
        "args": {"seconds": 5, "repeats": 3, "pin": "vm"},
        "limits": labels,
        "notes": [seed_eval.RR_NOTE, seed_eval.LOAD_NOTE],
        "uptime_before": ["0.5", "0.4", "0.3"],
        "uptime_after": ["0.6", "0.5", "0.4"],
        "modes": {m: {"ran": "r", "overlay_checks": ["ok"]} for m in cells},
        "elapsed_s": 1.0,
        **seed_eval.assemble(cells, {"interface": [1000.0], "router": [1000.0]}, paths),
    }


def test_json_shape_and_table() -> None:
    res = json.loads(json.dumps(result()))  # every figure is plain JSON
    assert set(res["medians"]["router"]["10 Mbit/s"]) == set(seed_eval.KINDS)
    assert res["medians"]["router"]["10 Mbit/s"]["bw_alone"] == pytest.approx(9.0)
    assert len(res["runs"]["interface"]["unlimited"]["bw_load"]) == 3
    assert res["normalised"]["router"]["10 Mbit/s"]["bandwidth"]["score"] == pytest.approx(0.9)
    assert set(res["vtdc"]["router"]) == {"ping_ms", "mbit_s"}
    assert set(res["vtdc"]["router"]["mbit_s"]) == {"meas", "exp", "phys"}
    table = seed_eval.render(res)
    assert "not netperf" in table and "SPECjbb" in table
    assert "router    10 Mbit/s" in table


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    assert "--quick" in out.stdout and "--plot FILE.json" in out.stdout


def test_plot_redraws_a_results_file(tmp_path: Path) -> None:
    path = tmp_path / "seed-x.json"
    path.write_text(json.dumps(result()))
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--plot", str(path), "--plots", str(tmp_path / "img")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    pngs = sorted(p.name for p in (tmp_path / "img").glob("*.png"))
    assert pngs == [
        "bandwidth-normalised.png",
        "bandwidth-vs-score.png",
        "latency-normalised.png",
        "transactions-vs-score.png",
    ]
    assert all((tmp_path / "img" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
