"""submit.py / helpers.client against an independent mock of the course server on loopback (127.0.0.1 only)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import client
from helpers.data import load_retrieval_set
from helpers.submission import load_submission, save_submission

ROOT = Path(__file__).resolve().parents[1]
SUBMIT = ROOT / "submit.py"
LOG = Path("submissions") / "submit_log.jsonl"


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """Requests to 127.0.0.1 never go through a proxy configured in the environment."""
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv(client.URL_ENV, raising=False)


# --------------------------------------------------------------------------------------------------------------
# The mock course server: records every request exactly and answers from a script
# --------------------------------------------------------------------------------------------------------------
class MockCourseServer:
    """A tiny http.server on 127.0.0.1; each answer is (status, body bytes, delay seconds); the last one repeats."""

    def __init__(self, script):
        self.script = list(script)
        self.received: list[dict] = []
        self.release = threading.Event()
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                mock.received.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, answer, delay = mock.script[min(len(mock.received), len(mock.script)) - 1]
                if delay:
                    mock.release.wait(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer)))
                    if 300 <= status < 400:
                        self.send_header("Location", "/moved/")
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_GET(self):  # noqa: N802 (a followed redirect would arrive here)
                mock.received.append({"path": self.path, "headers": dict(self.headers), "body": b"", "get": True})
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/retrieval/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)

    def bodies(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.received]


def free_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_submit(args, cwd, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(SUBMIT), *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------------------
# Submissions
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_run(demo_data, lite0):
    """Real rankings of the digits demo images by the pretrained default model."""
    from helpers.pipeline import run_retrieval

    return run_retrieval(demo_data, model=lite0, k=10, device="cpu", progress=False, num_workers=0)


@pytest.fixture(scope="module")
def protocol_submission(demo_data, tmp_path_factory) -> Path:
    """A valid dict submission built from the ground truth (relevant names first), for pure protocol tests."""
    dataset = load_retrieval_set(demo_data)
    rankings = {}
    for query, relevant in dataset.ground_truth.items():
        others = [n for n in dataset.gallery_names if n not in relevant]
        rankings[query] = (list(relevant) + others)[:10]
    return save_submission(tmp_path_factory.mktemp("sub") / "gt_based.json", rankings)


# --------------------------------------------------------------------------------------------------------------
# The exact body, for both formats
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["dict", "list"])
def test_submit_py_sends_exactly_groupname_and_images(fmt, real_run, demo_data, tmp_path):
    path = save_submission(tmp_path / f"run_{fmt}.json", real_run.rankings, fmt=fmt)
    raw = json.loads(path.read_text())
    assert isinstance(raw, dict if fmt == "dict" else list)
    answer = b'{"accuracy": 612.50}'
    with MockCourseServer([(200, answer, 0)]) as mock:
        done = run_submit([path, "--group", "team-7", "--url", mock.url, "--data", demo_data], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(mock.received) == 1
    request = mock.received[0]
    assert request["path"] == "/retrieval/"
    assert request["headers"]["Content-Type"] == "application/json"
    body = json.loads(request["body"])
    assert set(body) == {"groupname", "images"}
    assert body["groupname"] == "team-7"
    queries = load_retrieval_set(demo_data).query_names
    assert sorted(body["images"]) == sorted(queries)
    assert all(isinstance(v, list) and len(v) == 10 and all(isinstance(n, str) for n in v)
               for v in body["images"].values())
    assert body["images"] == real_run.rankings
    # the accuracy is printed as the server wrote it, not re-rounded
    assert "accuracy: 612.50" in done.stdout
    log = client.read_log(tmp_path / LOG)
    assert [r["outcome"] for r in log] == ["ok"]
    assert log[0]["sha256"] == client.file_sha256(path)
    assert log[0]["group"] == "team-7" and log[0]["url"] == mock.url and log[0]["status"] == 200


def test_url_comes_from_the_environment(protocol_submission, tmp_path):
    with MockCourseServer([(200, b'{"accuracy": 1000.0}', 0)]) as mock:
        done = run_submit([protocol_submission, "--group", "g"], cwd=tmp_path, env_extra={client.URL_ENV: mock.url})
    assert done.returncode == 0, done.stderr
    assert len(mock.received) == 1 and "accuracy: 1000.0" in done.stdout


# --------------------------------------------------------------------------------------------------------------
# Fault injection
# --------------------------------------------------------------------------------------------------------------
def test_server_down_exits_nonzero_in_bounded_time_and_logs_every_try(protocol_submission, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/retrieval/"
    done = run_submit([protocol_submission, "--group", "g", "--url", url, "--retries", "2", "--backoff", "0.01",
                       "--timeout", "2"], cwd=tmp_path, timeout=60)
    assert done.returncode == client.EXIT_FAILED
    assert "failed after 3 try(ies)" in done.stderr
    log = client.read_log(tmp_path / LOG)
    assert [(r["attempt"], r["of"], r["outcome"], r["status"]) for r in log] == [
        (1, 3, "connection-error", None), (2, 3, "connection-error", None), (3, 3, "connection-error", None)]


def submit_main(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return client.main([str(a) for a in args])


def test_500_then_success_is_retried(protocol_submission, tmp_path, monkeypatch, capsys):
    script = [(500, b'{"detail": "busy"}', 0), (200, b'{"accuracy": 733.3333333333334}', 0)]
    with MockCourseServer(script) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--retries", "3",
                            "--backoff", "0.01"], tmp_path, monkeypatch)
    assert code == 0
    assert len(mock.received) == 2 and mock.received[0]["body"] == mock.received[1]["body"]
    assert "accuracy: 733.3333333333334" in capsys.readouterr().out
    log = client.read_log(tmp_path / LOG)
    assert [(r["outcome"], r["status"]) for r in log] == [("http-error", 500), ("ok", 200)]
    assert log[1]["accuracy"] == 733.3333333333334


def test_slow_answer_past_the_timeout_is_not_retried_by_default(protocol_submission, tmp_path, monkeypatch, capsys):
    """The body was delivered: the server may have scored it, so a second try could count it twice."""
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 30)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--timeout", "0.4",
                            "--retries", "1", "--backoff", "0.01"], tmp_path, monkeypatch)
        assert len(mock.received) == 1
    assert code == client.EXIT_FAILED
    log = client.read_log(tmp_path / LOG)
    assert [(r["outcome"], r["body_sent"]) for r in log] == [("timeout", True)]
    captured = capsys.readouterr()
    assert "timeout" in captured.err and "--retry-after-timeout" in captured.out


def test_retry_after_timeout_retries_a_delivered_body(protocol_submission, tmp_path, monkeypatch):
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 30)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--timeout", "0.4",
                            "--retries", "1", "--backoff", "0.01", "--retry-after-timeout"], tmp_path, monkeypatch)
        assert len(mock.received) == 2
    assert code == client.EXIT_FAILED
    assert [r["outcome"] for r in client.read_log(tmp_path / LOG)] == ["timeout", "timeout"]


def test_retry_rule():
    attempt = client.Attempt
    assert client.is_retryable(attempt(1, "connection-error"))
    assert client.is_retryable(attempt(1, "timeout", body_sent=False))
    assert not client.is_retryable(attempt(1, "timeout", body_sent=True))
    assert client.is_retryable(attempt(1, "timeout", body_sent=True), retry_after_timeout=True)
    assert client.is_retryable(attempt(1, "http-error", status=503))
    for outcome, status in (("http-error", 404), ("http-error", 429), ("redirect", 302), ("bad-answer", 200)):
        assert not client.is_retryable(attempt(1, outcome, status=status), retry_after_timeout=True)


def test_non_json_answer_is_shown_shortened_and_not_retried(protocol_submission, tmp_path, monkeypatch, capsys):
    page = b"<html><body>" + b"x" * 5000 + b"</body></html>"
    with MockCourseServer([(200, page, 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--retries", "3",
                            "--backoff", "0.01"], tmp_path, monkeypatch)
    assert code == client.EXIT_FAILED
    assert len(mock.received) == 1
    err = capsys.readouterr().err
    assert "<html><body>xxx" in err and "more characters]" in err and len(err) < 2000
    log = client.read_log(tmp_path / LOG)
    assert [r["outcome"] for r in log] == ["bad-answer"]
    assert log[0]["answer"].startswith("<html><body>") and len(log[0]["answer"]) < 1000


def test_json_answer_without_accuracy_is_a_failure(protocol_submission, tmp_path, monkeypatch, capsys):
    with MockCourseServer([(200, b'{"error": "unknown group"}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--backoff", "0.01"],
                           tmp_path, monkeypatch)
    assert code == client.EXIT_FAILED and len(mock.received) == 1
    assert '{"error": "unknown group"}' in capsys.readouterr().err


@pytest.mark.parametrize("status", [400, 404, 422])
def test_4xx_is_never_retried(status, protocol_submission, tmp_path, monkeypatch, capsys):
    with MockCourseServer([(status, b'{"error": "bad payload"}', 0), (200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--retries", "3",
                            "--backoff", "0.01"], tmp_path, monkeypatch)
    assert code == client.EXIT_FAILED
    assert len(mock.received) == 1
    assert f"HTTP {status}" in capsys.readouterr().err
    assert [(r["outcome"], r["status"]) for r in client.read_log(tmp_path / LOG)] == [("http-error", status)]


def test_backoff_doubles_up_to_the_cap(protocol_submission, tmp_path):
    waits: list[float] = []
    url = f"http://127.0.0.1:{free_port()}/retrieval/"
    result = client.submit(protocol_submission, "g", url=url, retries=4, backoff=0.5, max_backoff=3.0,
                           timeout=2, log_path=tmp_path / "log.jsonl", echo=None, sleep=waits.append)
    assert not result.ok and result.sent and len(result.attempts) == 5
    assert waits == [0.5, 1.0, 2.0, 3.0]
    assert len(client.read_log(tmp_path / "log.jsonl")) == 5


# --------------------------------------------------------------------------------------------------------------
# Validation, --force, --dry-run
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def broken_submission(protocol_submission, tmp_path) -> Path:
    rankings = load_submission(protocol_submission)
    queries = list(rankings)
    rankings[queries[0]] = rankings[queries[0]][:9]  # 9 names
    rankings[queries[1]][3] = rankings[queries[1]][2]  # a duplicate
    rankings[queries[2]][5] = ""  # an empty name
    return save_submission(tmp_path / "broken.json", rankings, fmt="list")


def test_invalid_submission_lists_problems_and_sends_nothing(broken_submission, tmp_path, monkeypatch, capsys):
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([broken_submission, "--group", "g", "--url", mock.url], tmp_path, monkeypatch)
        assert code == client.EXIT_NOT_SENT and mock.received == []
        err = capsys.readouterr().err
        assert "3 problem(s), nothing sent" in err
        assert "9 names, expected 10" in err and "duplicate names" in err and "1 empty name(s)" in err
        code = submit_main([broken_submission, "--group", "g", "--url", mock.url, "--force"], tmp_path, monkeypatch)
        assert code == 0 and len(mock.received) == 1
    sent = mock.bodies()[0]
    assert sent["images"] == load_submission(broken_submission)


def test_data_option_checks_names_exist(protocol_submission, demo_data, tmp_path, monkeypatch, capsys):
    rankings = load_submission(protocol_submission)
    first = next(iter(rankings))
    rankings[first][9] = "not_in_gallery.png"
    rankings["stranger.png"] = rankings[first]
    path = save_submission(tmp_path / "names.json", rankings)
    assert submit_main([path, "--group", "g", "--dry-run"], tmp_path, monkeypatch) == 0  # well-formed
    code = submit_main([path, "--group", "g", "--dry-run", "--data", demo_data], tmp_path, monkeypatch)
    err = capsys.readouterr().err
    assert code == client.EXIT_NOT_SENT
    assert "not in the gallery" in err and "stranger.png: not a known query" in err


def test_dry_run_prints_a_summary_and_sends_nothing(protocol_submission, tmp_path, monkeypatch, capsys):
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--dry-run"], tmp_path,
                           monkeypatch)
    assert code == 0 and mock.received == []
    n = len(load_submission(protocol_submission))
    out = capsys.readouterr().out
    assert f"{n} queries, names per query: 10" in out and "groupname: 'g'" in out and "nothing sent" in out
    assert not (tmp_path / LOG).exists()


def test_empty_group_and_bad_url_are_refused(protocol_submission, tmp_path, monkeypatch, capsys):
    assert submit_main([protocol_submission, "--group", " "], tmp_path, monkeypatch) == client.EXIT_NOT_SENT
    assert "group name is empty" in capsys.readouterr().err
    assert submit_main([protocol_submission, "--group", "g", "--url", "tatooine:3001"], tmp_path,
                       monkeypatch) == client.EXIT_NOT_SENT
    assert "http://" in capsys.readouterr().err
    assert submit_main([tmp_path / "absent.json", "--group", "g"], tmp_path, monkeypatch) == client.EXIT_NOT_SENT
    assert "not found" in capsys.readouterr().err


def test_rankings_in_memory_are_saved_then_sent(protocol_submission, tmp_path, monkeypatch):
    """The notebook path: helpers.client.submit(rankings, group) keeps a file of what it sent."""
    monkeypatch.chdir(tmp_path)
    rankings = load_submission(protocol_submission)
    as_list = [{"filename": q, "samples": names} for q, names in rankings.items()]
    with MockCourseServer([(200, b'{"accuracy": 1000.0}', 0)]) as mock:
        result = client.submit(as_list, "notebook-team", url=mock.url, echo=None)
    assert result.ok and result.accuracy == 1000.0 and result.exit_code == 0
    assert mock.bodies() == [{"groupname": "notebook-team", "images": rankings}]
    saved = sorted((tmp_path / "submissions" / "sent").glob("*_notebook-team.json"))
    assert len(saved) == 1 and load_submission(saved[0]) == rankings
    log = client.read_log(tmp_path / LOG)
    assert log[0]["sha256"] == client.file_sha256(saved[0]) and log[0]["outcome"] == "ok"


def test_non_ascii_names_arrive_intact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rankings = {"caffè_0.jpg": [f"ñandú_{i}.jpg" for i in range(10)], "東京.png": [f"写真{i}.png" for i in range(10)]}
    with MockCourseServer([(200, b'{"accuracy": 0}', 0)]) as mock:
        result = client.submit(rankings, "gruppo-ü", url=mock.url, echo=None)
    assert result.ok and result.accuracy_text == "0"
    assert mock.bodies() == [{"groupname": "gruppo-ü", "images": rankings}]
    assert mock.received[0]["body"].isascii()


# --------------------------------------------------------------------------------------------------------------
# Hostile servers and bad options
# --------------------------------------------------------------------------------------------------------------
class TricklingServer:
    """A raw socket server on 127.0.0.1: reads the request, then sends ``head`` and trickles ``trickle`` one byte
    every ``interval`` seconds (at most ``len(trickle)`` bytes: a bounded loop), then closes."""

    def __init__(self, head: bytes, trickle: bytes, interval: float = 0.5):
        self.head, self.trickle, self.interval = head, trickle, interval
        self.stop = threading.Event()
        self.received = b""
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/retrieval/"
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                conn.settimeout(2)
                try:
                    while b"}}" not in self.received:  # the JSON body ends with "}}"
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        self.received += chunk
                    conn.sendall(self.head)
                    for byte in self.trickle:
                        if self.stop.wait(self.interval):
                            break
                        conn.sendall(bytes([byte]))
                except OSError:
                    pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.mark.parametrize("what", ["headers", "body"])
def test_timeout_bounds_a_try_when_the_server_trickles(what, protocol_submission, tmp_path):
    """A byte every 0.5 s for up to 20 s: each read makes progress, yet the try must end near its timeout."""
    if what == "headers":
        head, trickle = b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a" * 40
    else:
        head, trickle = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n", \
            b'{"accuracy": 1.0' + b" " * 24
    timeout = 1.5
    with TricklingServer(head, trickle) as server:
        start = time.monotonic()
        result = client.submit(protocol_submission, "g", url=server.url, timeout=timeout, retries=2, backoff=0.01,
                               log_path=tmp_path / "log.jsonl", echo=None)
        elapsed = time.monotonic() - start
    assert elapsed < 3 * timeout, elapsed
    assert not result.ok and [a.outcome for a in result.attempts] == ["timeout"]  # delivered: not retried
    assert result.attempts[0].body_sent and b'"groupname":"g"' in server.received
    assert result.exit_code == client.EXIT_FAILED


@pytest.mark.parametrize("option, value, needle", [
    ("--timeout", "nan", "--timeout must be a finite number"),
    ("--timeout", "inf", "--timeout must be a finite number"),
    ("--timeout", "0", "--timeout must be a finite number, positive"),
    ("--timeout", "-1", "--timeout must be a finite number"),
    ("--backoff", "nan", "--backoff must be a finite number"),
    ("--backoff", "-0.5", "--backoff must be a finite number"),
    ("--retries", "21", "--retries must be an integer from 0 to 20"),
    ("--retries", "-1", "--retries must be an integer from 0 to 20"),
])
def test_bad_numeric_options_exit_2_with_nothing_sent(option, value, needle, protocol_submission, tmp_path,
                                                     monkeypatch, capsys):
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, f"{option}={value}"],
                           tmp_path, monkeypatch)
    assert code == client.EXIT_NOT_SENT and mock.received == []
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / LOG).exists()


@pytest.mark.parametrize("answer, reason", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"accuracy": NaN}', "NaN"),
    (b'{"accuracy": Infinity}', "Infinity"),
    (b'{"accuracy": "high"}', "str, not a number"),
    (b'{"accuracy": null}', "null, not a number"),
    (b'{"accuracy": true}', "bool, not a number"),
    (b'{"accuracy": [612.5]}', "list, not a number"),
])
def test_unusable_answers_are_a_failed_logged_try(answer, reason, protocol_submission, tmp_path, monkeypatch,
                                                  capsys):
    with MockCourseServer([(200, answer, 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--backoff", "0.01"],
                           tmp_path, monkeypatch)
    assert code == client.EXIT_FAILED and len(mock.received) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: not accepted") and reason in err and "Traceback" not in err
    log = client.read_log(tmp_path / LOG)
    assert [(r["outcome"], r["accuracy"]) for r in log] == [("bad-answer", None)] and reason in log[0]["error"]


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirects_are_not_followed(status, protocol_submission, tmp_path, monkeypatch, capsys):
    with MockCourseServer([(status, b"", 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--retries", "2"],
                           tmp_path, monkeypatch)
    assert code == client.EXIT_FAILED
    assert [(r["path"], "get" in r) for r in mock.received] == [("/retrieval/", False)]
    assert "redirected to /moved/; not followed" in capsys.readouterr().err
    assert [(r["outcome"], r["status"]) for r in client.read_log(tmp_path / LOG)] == [("redirect", status)]


def test_an_unwritable_log_exits_2_before_sending(protocol_submission, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--log",
                            blocker / "log.jsonl"], tmp_path, monkeypatch)
    assert code == client.EXIT_NOT_SENT and mock.received == []
    err = capsys.readouterr().err
    assert err.startswith("error: cannot open the log") and len(err.strip().splitlines()) == 1


def test_token_is_sent_as_a_bearer_header_and_never_logged(protocol_submission, tmp_path, monkeypatch):
    with MockCourseServer([(200, b'{"accuracy": 1.0}', 0)]) as mock:
        code = submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--token", "s3cr3t-T0ken"],
                           tmp_path, monkeypatch)
    assert code == 0 and mock.received[0]["headers"]["Authorization"] == "Bearer s3cr3t-T0ken"
    assert "s3cr3t-T0ken" not in (tmp_path / LOG).read_text()
    assert submit_main([protocol_submission, "--group", "g", "--url", mock.url, "--token", "two words"],
                       tmp_path, monkeypatch) == client.EXIT_NOT_SENT
