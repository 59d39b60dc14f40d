"""The local evaluation server (helpers.server, `python -m helpers serve`), on loopback only."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import client
from helpers.cli import main as cli_main
from helpers.data import load_retrieval_set
from helpers.metrics import evaluate_rankings
from helpers.server import background_server, create_app, parse_body, PayloadError
from helpers.server_guard import RateLimiter, ServerLimits, load_tokens
from helpers.submission import save_submission

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def dataset(demo_data):
    return load_retrieval_set(demo_data)


@pytest.fixture(scope="module")
def real_run(demo_data, lite0):
    """Real rankings of the digits demo images by the pretrained default model."""
    from helpers.pipeline import run_retrieval

    return run_retrieval(demo_data, model=lite0, k=10, device="cpu", progress=False, num_workers=0)


def perfect_rankings(dataset) -> dict[str, list[str]]:
    """Relevant names first, then other gallery names: 10 per query."""
    rankings = {}
    for query, relevant in dataset.ground_truth.items():
        others = [n for n in dataset.gallery_names if n not in relevant]
        rankings[query] = (list(relevant) + others)[:10]
    return rankings


def make_client(dataset, tmp_path, **options):
    from fastapi.testclient import TestClient

    app = create_app(dataset.ground_truth_path, db=tmp_path / "server.sqlite3", gallery_names=dataset.gallery_names,
                     **options)
    return TestClient(app, raise_server_exceptions=False)


# --------------------------------------------------------------------------------------------------------------
# Scoring and the protocol
# --------------------------------------------------------------------------------------------------------------
def test_scores_like_the_evaluation_module_whatever_the_content_type(dataset, real_run, tmp_path):
    http = make_client(dataset, tmp_path)
    payload = {"groupname": "g", "images": real_run.rankings}
    expected = evaluate_rankings(real_run.rankings, dataset.ground_truth).metrics
    body = json.dumps(payload)
    variants = [
        {"json": payload},
        {"content": body},  # no Content-Type at all, as requests.post(url, json.dumps(...)) sends
        {"content": body, "headers": {"Content-Type": "text/plain"}},
        {"content": body, "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}},  # a JSON string of JSON
    ]
    for variant in variants:
        answer = http.post("/retrieval/", **variant)
        assert answer.status_code == 200, (variant.get("headers"), answer.text)
        result = answer.json()
        assert result["accuracy"] == expected["weighted_score"]
        for key, value in expected.items():
            assert result[key] == value
        assert result["unknown_queries"] == 0 and result["unknown_gallery_names"] == 0
    assert 0 < expected["weighted_score"] < 1000  # a real, imperfect run
    assert http.post("/retrieval", json={"groupname": "g", "images": perfect_rankings(dataset)}).json()[
        "accuracy"] == 1000.0


def test_unknown_queries_and_gallery_names_are_misses_and_reported(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    rankings = perfect_rankings(dataset)
    queries = list(rankings)
    rankings[queries[0]] = ["nowhere.png"] + rankings[queries[0]][1:]  # rank 1 not in the gallery
    del rankings[queries[1]]  # a missing query
    rankings["intruder.png"] = rankings[queries[2]]  # a query the ground truth does not know
    result = http.post("/retrieval/", json={"groupname": "g", "images": rankings}).json()
    expected = evaluate_rankings(rankings, dataset.ground_truth).metrics["weighted_score"]
    n = len(dataset.ground_truth)
    assert result["accuracy"] == expected == pytest.approx((1000 * (n - 2) + 400) / n)
    assert result["unknown_queries"] == 1 and result["missing_queries"] == 1
    assert result["unknown_gallery_names"] == 1
    joined = " ".join(result["problems"])
    assert "intruder.png" in joined and "nowhere.png" in joined


MALFORMED = {
    "empty": b"",
    "not json": b"groupname=g&images=x",
    "truncated": b'{"groupname": "g", "images": {"q.png": ["a.png"',
    "not utf-8": b'{"groupname": "\xff\xfe", "images": {}}',
    "deeply nested": b"[" * 200_000 + b"]" * 200_000,
    "deep object": (b'{"a":' * 100_000) + b"1" + b"}" * 100_000,
    "nested in a name list": b'{"groupname": "g", "images": {"q.png": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
    "a list": b'[{"filename": "q.png", "samples": ["a.png"]}]',
    "a number": b"42",
    "null": b"null",
    "a plain string": b'"hello"',
    "no groupname": b'{"images": {}}',
    "no images": b'{"groupname": "g"}',
    "groupname a number": b'{"groupname": 5, "images": {}}',
    "groupname null": b'{"groupname": null, "images": {}}',
    "groupname empty": b'{"groupname": "  ", "images": {}}',
    "groupname too long": json.dumps({"groupname": "g" * 1000, "images": {}}).encode(),
    "images a list": b'{"groupname": "g", "images": ["a.png"]}',
    "names a string": b'{"groupname": "g", "images": {"q.png": "a.png"}}',
    "names numbers": b'{"groupname": "g", "images": {"q.png": [1, 2]}}',
    "names null": b'{"groupname": "g", "images": {"q.png": [null]}}',
    "names objects": b'{"groupname": "g", "images": {"q.png": [{"a": 1}]}}',
    "NaN": b'{"groupname": "g", "images": {"q.png": [NaN]}}',
    "name too long": json.dumps({"groupname": "g", "images": {"q.png": ["a" * 256 + ".png"]}}).encode(),
    "query too long": json.dumps({"groupname": "g", "images": {"q" * 300: ["a.png"]}}).encode(),
    "too many names": json.dumps({"groupname": "g", "images": {"q.png": [f"{i}.png" for i in range(101)]}}).encode(),
}


def test_malformed_requests_get_a_clear_4xx_never_500(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    for label, body in MALFORMED.items():
        for headers in ({}, {"Content-Type": "application/json"}):
            answer = http.post("/retrieval/", content=body, headers=headers)
            assert 400 <= answer.status_code < 500, (label, answer.status_code, answer.text[:200])
            assert isinstance(answer.json()["error"], str) and answer.json()["error"], label
    assert http.get("/leaderboard").json()["leaderboard"] == []  # nothing malformed was stored
    assert 400 <= http.get("/retrieval/").status_code < 500
    assert 400 <= http.put("/retrieval/", content=b"{}").status_code < 500


def test_parse_body_messages_name_the_problem():
    with pytest.raises(PayloadError, match="missing field.*images") as info:
        parse_body(b'{"groupname": "g"}')
    assert info.value.status == 422
    with pytest.raises(PayloadError, match="nested too deeply"):
        parse_body(b"[" * 100_000)
    with pytest.raises(PayloadError, match="at most 3"):
        parse_body(b'{"groupname": "g", "images": {"q": ["a", "b", "c", "d"]}}', max_names=3)
    assert parse_body(b'{"groupname": " g ", "images": {"q": ["a"]}, "extra": 1}') == ("g", {"q": ["a"]})


def test_limits_are_configurable_and_oversized_bodies_refused(dataset, tmp_path):
    http = make_client(dataset, tmp_path, limits=ServerLimits(max_body_bytes=2000, max_names=12))
    rankings = perfect_rankings(dataset)
    small = {"groupname": "g", "images": dict(list(rankings.items())[:2])}
    assert http.post("/retrieval/", json=small).status_code == 200
    big = json.dumps({"groupname": "g", "images": rankings}).encode()
    assert len(big) > 2000
    answer = http.post("/retrieval/", content=big)
    assert answer.status_code == 413 and "2000" in answer.json()["error"]
    # without a Content-Length (chunked), the limit still holds while reading
    answer = http.post("/retrieval/", content=iter([big[i:i + 500] for i in range(0, len(big), 500)]))
    assert answer.status_code == 413
    too_many = {"groupname": "g", "images": {"q.png": [f"{i}.png" for i in range(13)]}}
    answer = http.post("/retrieval/", json=too_many)
    assert answer.status_code == 422 and "at most 12" in answer.json()["error"]


def test_leaderboard_keeps_best_and_latest_and_escapes_html(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    perfect = perfect_rankings(dataset)
    half = {q: names for i, (q, names) in enumerate(perfect.items()) if i % 2 == 0}
    for group, images in [("alpha", perfect), ("alpha", half), ("<b>beta</b>", half)]:
        assert http.post("/retrieval/", json={"groupname": group, "images": images}).status_code == 200
    board = http.get("/leaderboard").json()["leaderboard"]
    half_score = evaluate_rankings(half, dataset.ground_truth).metrics["weighted_score"]
    assert [(r["groupname"], r["best"], r["latest"], r["submissions"]) for r in board] == [
        ("alpha", 1000.0, half_score, 2), ("<b>beta</b>", half_score, half_score, 1)]
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "&lt;b&gt;beta&lt;/b&gt;" in page.text and "<b>beta</b>" not in page.text and "alpha" in page.text


# --------------------------------------------------------------------------------------------------------------
# End to end: real uvicorn on loopback, submit.py, evaluate, restart
# --------------------------------------------------------------------------------------------------------------
def test_submit_py_against_the_served_app_matches_evaluate_and_survives_restart(dataset, real_run, tmp_path,
                                                                               monkeypatch):
    import requests

    submission = save_submission(tmp_path / "run.json", real_run.rankings, fmt="list")
    db = tmp_path / "board.sqlite3"
    metrics_file = tmp_path / "metrics.json"
    assert cli_main(["evaluate", "--submission", str(submission), "--ground-truth", str(dataset.ground_truth_path),
                     "--metrics-out", str(metrics_file)]) == 0
    evaluated = json.loads(metrics_file.read_text())["metrics"]["weighted_score"]

    app = create_app(dataset.ground_truth_path, db=db, gallery_names=dataset.gallery_names)
    with background_server(app) as server:
        url = f"{server.url}/retrieval/"
        done = subprocess.run([sys.executable, str(ROOT / "submit.py"), str(submission), "--group", "team-e2e",
                               "--url", url, "--timeout", "30", "--data", str(dataset.root)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120, env=dict(os.environ))
        assert done.returncode == 0, done.stderr
        printed = [line for line in done.stdout.splitlines() if line.startswith("accuracy: ")]
        assert printed and float(printed[0].split()[1]) == evaluated
        # the course's client template: json.dumps output posted as data, no Content-Type
        template = requests.post(url, json.dumps({"groupname": "template", "images": real_run.rankings}), timeout=30)
        assert template.status_code == 200 and template.json()["accuracy"] == evaluated
        # malformed over a real socket: 4xx, never 500
        for body in (b"{", b"[" * 100_000, b'{"groupname": "g", "images": {"q": [1]}}'):
            assert 400 <= requests.post(url, data=body, timeout=30).status_code < 500
        board_before = requests.get(f"{server.url}/leaderboard", timeout=30).json()["leaderboard"]
    log = client.read_log(tmp_path / "submissions" / "submit_log.jsonl")
    assert [(r["outcome"], r["accuracy"]) for r in log] == [("ok", evaluated)]

    restarted = create_app(dataset.ground_truth_path, db=db, gallery_names=dataset.gallery_names)
    with background_server(restarted) as server:
        board_after = requests.get(f"{server.url}/leaderboard", timeout=30).json()["leaderboard"]
        assert "team-e2e" in requests.get(server.url + "/", timeout=30).text
    assert board_after == board_before
    assert {r["groupname"]: r["best"] for r in board_after} == {"team-e2e": evaluated, "template": evaluated}


def test_serve_verb_parses_and_refuses_bad_input(dataset, tmp_path, capsys):
    from helpers.cli import build_parser

    args = build_parser().parse_args(["serve", "--ground-truth", str(dataset.ground_truth_path)])
    assert (args.host, args.port, args.max_names) == ("127.0.0.1", 3001, 100)
    assert args.max_body_mb == 10
    assert cli_main(["serve", "--ground-truth", str(tmp_path / "absent.json"), "--db",
                     str(tmp_path / "x.sqlite3")]) == 2
    assert "cannot read ground truth" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# Hostile input: names, failures, sizes, rates, tokens, foreign pages
# --------------------------------------------------------------------------------------------------------------
BAD_NAMES = {
    "lone surrogate": "\\ud800",
    "NUL": "\\u0000",
    "control character": "\\u0007",
    "bidi override": "\\u202e",
    "bidi isolate": "\\u2066",
}


@pytest.mark.parametrize("label", sorted(BAD_NAMES))
@pytest.mark.parametrize("where", ["group", "query", "gallery"])
def test_names_with_invisible_or_invalid_characters_are_refused(label, where, dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    bad = BAD_NAMES[label]
    query, names = next(iter(perfect_rankings(dataset).items()))
    names_json = json.dumps(names)
    group, query_json = '"team"', json.dumps(query)
    if where == "group":
        group = f'"te{bad}am"'
    elif where == "query":
        query_json = f'"q{bad}.png"'
    else:
        names_json = json.dumps(names[:9])[:-1] + f', "g{bad}.png"]'
    body = f'{{"groupname": {group}, "images": {{{query_json}: {names_json}}}}}'.encode()
    answer = http.post("/retrieval/", content=body)
    assert answer.status_code == 422, (label, where, answer.status_code, answer.text[:200])
    assert "U+" in answer.json()["error"]
    assert http.get("/leaderboard").json()["leaderboard"] == []


def test_group_names_are_refused_when_invisible_and_normalised_when_composed(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    rankings = perfect_rankings(dataset)
    zero_width = http.post("/retrieval/", json={"groupname": "te\u200bam", "images": rankings})
    assert zero_width.status_code == 422 and "U+200B" in zero_width.json()["error"]
    for spelling in ("caf\u00e9", "cafe\u0301"):  # the same name, composed and decomposed
        assert http.post("/retrieval/", json={"groupname": spelling, "images": rankings}).status_code == 200
    board = http.get("/leaderboard").json()["leaderboard"]
    assert [(r["groupname"], r["submissions"]) for r in board] == [("caf\u00e9", 2)]


def test_any_other_failure_is_a_json_500(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    store = http.app.state.store

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    store.add = broken
    store.leaderboard = broken
    answer = http.post("/retrieval/", json={"groupname": "g", "images": perfect_rankings(dataset)})
    assert answer.status_code == 500 and "internal error" in answer.json()["error"]
    answer = http.get("/leaderboard")
    assert answer.status_code == 500 and "internal error" in answer.json()["error"]


def test_only_the_top_k_names_of_known_queries_are_stored(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    rankings = perfect_rankings(dataset)
    padded = {q: names + [f"pad{i}.png" for i in range(90)] for q, names in rankings.items()}
    padded.update({f"stranger{i}.png": [f"x{j}.png" for j in range(100)] for i in range(50)})
    answer = http.post("/retrieval/", json={"groupname": "g", "images": padded})
    assert answer.status_code == 200 and answer.json()["accuracy"] == 1000.0
    with sqlite3.connect(tmp_path / "server.sqlite3") as db:
        (stored,) = db.execute("SELECT images FROM submissions").fetchone()
    assert json.loads(stored) == rankings


def test_far_more_queries_than_the_ground_truth_are_refused(dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    n = len(dataset.ground_truth)
    allowed = max(2 * n, n + 100)
    names = [f"g{i}.png" for i in range(10)]
    images = {f"q{i}.png": names for i in range(allowed + 1)}
    answer = http.post("/retrieval/", json={"groupname": "g", "images": images})
    assert answer.status_code == 413 and f"at most {allowed}" in answer.json()["error"]
    images.popitem()
    assert http.post("/retrieval/", json={"groupname": "g", "images": images}).status_code == 200


def test_bodies_held_at_once_are_capped(dataset, tmp_path):
    http = make_client(dataset, tmp_path, limits=ServerLimits(max_body_bytes=4000, max_pending_bytes=4000))
    scorer = http.app.state.scorer
    body = {"groupname": "g", "images": dict(list(perfect_rankings(dataset).items())[:2])}
    scorer.pending = 4000 - 10  # other requests already hold nearly the whole budget
    busy = http.post("/retrieval/", json=body)
    assert busy.status_code == 503 and "too many bodies" in busy.json()["error"] and busy.headers["Retry-After"]
    assert scorer.pending == 4000 - 10  # what this request held was given back
    scorer.pending = 0
    assert http.post("/retrieval/", json=body).status_code == 200 and scorer.pending == 0


def test_each_group_is_rate_limited(dataset, tmp_path):
    http = make_client(dataset, tmp_path, limits=ServerLimits(rate_per_minute=2))
    body = {"groupname": "a", "images": perfect_rankings(dataset)}
    assert [http.post("/retrieval/", json=body).status_code for _ in range(2)] == [200, 200]
    refused = http.post("/retrieval/", json=body)
    assert refused.status_code == 429 and "try again" in refused.json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert http.post("/retrieval/", json={**body, "groupname": "b"}).status_code == 200
    assert {r["groupname"]: r["submissions"] for r in http.get("/leaderboard").json()["leaderboard"]} == {"a": 2, "b": 1}


def test_rate_limiter_window_slides():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    assert [limiter.wait_needed("g") for _ in range(2)] == [0.0, 0.0]
    now[0] = 30.0
    assert limiter.wait_needed("g") == pytest.approx(30.0)
    now[0] = 60.5
    assert limiter.wait_needed("g") == 0.0
    assert RateLimiter(0).wait_needed("g") == 0.0


def test_tokens_restrict_groups(dataset, tmp_path):
    http = make_client(dataset, tmp_path, tokens={"team-a": "token-aaaa1111", "team-b": "token-bbbb2222"})
    images = perfect_rankings(dataset)

    def post(group, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return http.post("/retrieval/", json={"groupname": group, "images": images}, headers=headers)

    assert post("team-a").status_code == 401
    assert post("team-a", "token-bbbb2222").status_code == 401
    assert post("team-c", "token-aaaa1111").status_code == 403
    answer = post("team-a", "token-aaaa1111")
    assert answer.status_code == 200 and answer.json()["accuracy"] == 1000.0
    assert [r["groupname"] for r in http.get("/leaderboard").json()["leaderboard"]] == ["team-a"]


@pytest.mark.parametrize("content", ['["a"]', '{"g": 5}', '{"g": "short"}', '{}', "not json"])
def test_bad_tokens_files_are_refused_at_start(content, dataset, tmp_path, capsys):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(content)
    with pytest.raises(ValueError, match="tokens file|token of group"):
        load_tokens(tokens)
    assert cli_main(["serve", "--ground-truth", str(dataset.ground_truth_path), "--db", str(tmp_path / "x.db"),
                     "--tokens", str(tokens)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("headers, status", [
    ({}, 200),
    ({"Origin": "http://testserver"}, 200),
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Host": "evil.example"}, 403),
    ({"Host": "localhost"}, 200),
])
def test_foreign_origin_or_host_is_refused(headers, status, dataset, tmp_path):
    http = make_client(dataset, tmp_path)
    answer = http.post("/retrieval/", json={"groupname": "g", "images": perfect_rankings(dataset)}, headers=headers)
    assert answer.status_code == status, answer.text[:200]
    assert ("error" in answer.json()) == (status != 200)
    assert http.get("/leaderboard", headers=headers).status_code == status


def _raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return _read_until_closed(sock)


def _read_until_closed(sock, limit: int = 200) -> bytes:
    answer = b""
    for _ in range(limit):  # bounded
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not chunk:
            break
        answer += chunk
    return answer


def test_real_server_limits_slow_clients_connections_and_checks_hosts(dataset, tmp_path):
    """One real uvicorn on loopback: slow bodies get 408, slow heads are dropped (first when a real client needs
    room), busy connections are capped with 503, Host and Origin are checked on the socket, and --token gets
    through."""
    import time

    limits = ServerLimits(read_timeout=1.0, head_timeout=1.0, max_connections=3)
    app = create_app(dataset.ground_truth_path, db=tmp_path / "s.db", limits=limits, tokens={"g": "token-gggg1234"})
    with background_server(app) as server:
        port = server.port
        start = time.monotonic()
        slow_body = _raw_request(port, b"POST /retrieval/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 500\r\n"
                                       b"\r\n{\"groupname\"" % port)
        assert slow_body.startswith(b"HTTP/1.1 408") and b'"error"' in slow_body
        assert time.monotonic() - start < 5
        idle = []
        for _ in range(3):  # heads that never end fill every connection slot
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            idle[-1].sendall(b"POST /retrieval/ HTTP/1.1\r\nHo")
            time.sleep(0.05)
        real = _raw_request(port, b"GET /leaderboard HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                            % port)
        assert real.startswith(b"HTTP/1.1 200")  # a real client is served: the oldest slow connection made room
        assert _read_until_closed(idle[0]) == b""  # ... closed at once
        start = time.monotonic()
        assert all(_read_until_closed(sock) == b"" for sock in idle[1:])  # the others at the head deadline
        assert time.monotonic() - start < 5
        for sock in idle:
            sock.close()
        busy = []
        for _ in range(3):  # bodies still arriving: busy connections, never closed to make room
            busy.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            busy[-1].sendall(b"POST /retrieval/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 99\r\n\r\n{" % port)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as extra:  # answered as soon as it opens
            refused = _read_until_closed(extra)
        assert refused.startswith(b"HTTP/1.1 503") and b'"error"' in refused
        assert all(_read_until_closed(sock).startswith(b"HTTP/1.1 408") for sock in busy)
        for sock in busy:
            sock.close()
        for host, origin, status in ((f"127.0.0.1:{port}", None, b"200"), (f"localhost:{port}", None, b"200"),
                                     (f"attacker.example:{port}", None, b"403"),
                                     (f"127.0.0.1:{port}", f"http://localhost:{port}", b"200"),
                                     (f"127.0.0.1:{port}", "http://attacker.example", b"403")):
            head = f"GET /leaderboard HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            head += f"Origin: {origin}\r\n" if origin else ""
            assert _raw_request(port, (head + "\r\n").encode()).startswith(b"HTTP/1.1 " + status), (host, origin)
        url = f"{server.url}/retrieval/"
        protocol_submission = save_submission(tmp_path / "perfect.json", perfect_rankings(dataset))
        refused = client.submit(protocol_submission, "g", url=url, log_path=None, echo=None)
        assert refused.status == 401 and not refused.ok
        accepted = client.submit(protocol_submission, "g", url=url, token="token-gggg1234", log_path=None, echo=None)
        assert accepted.ok and accepted.accuracy == 1000.0


def test_serve_help_states_the_limits(capsys):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--max-body-mb", "--read-timeout", "--head-timeout", "--max-connections", "--rate-limit",
                   "--max-queries", "--tokens", "--allow-host", "Host or Origin", "top-k names of known queries",
                   "Not protected"):
        assert needle in text, needle
