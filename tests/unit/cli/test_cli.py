"""The `cwm` CLI: command line -> control op mapping, output modes and exit codes.

`cli.main` runs in process against a real ControlServer on a temp socket, served by
the FakeConnector of mcp_fakes.py (same op signatures); thaw --warm/--continue
and health talk to its FakeVllm HTTP server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp_fakes import (
    DIGESTS,
    PROMETHEUS_TEXT,
    REPO_ROOT,
    SESSION_TOKENS,
    FakeConnector,
    FakeVllm,
    closed_url,
)

from cwm_connector import cli

LIST_DEFAULTS = {
    "tags": None,
    "model": None,
    "session": None,
    "search": None,
    "sort_by": "name",
    "sort_order": "asc",
    "limit": None,
    "offset": 0,
}


@pytest.fixture
def served(connector: tuple[Path, FakeConnector]) -> tuple[Path, FakeConnector]:
    """The connector fixture holding window 'w' (salt s1)."""
    path, fake = connector
    fake.op_freeze("s1", "w")
    return path, fake


def run_cli(
    capsys: pytest.CaptureFixture[str], path: Path, *argv: str, as_json: bool = True
) -> tuple[int, Any, str]:
    """(exit code, stdout parsed as one JSON document or raw text, stderr)."""
    code = cli.main([*argv, "--socket", str(path), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if as_json else out), err


CASES: list[tuple[list[str], tuple[str, dict[str, Any]]]] = [
    (
        ["freeze", "s1", "a", "--description", "the plan", "--tag", "x", "--tag", "y"],
        ("freeze", {"salt": "s1", "name": "a", "overwrite": False,
                    "description": "the plan", "tags": ["x", "y"]}),
    ),
    (
        ["freeze", DIGESTS["s2"], "w", "--overwrite"],
        ("freeze", {"salt": DIGESTS["s2"], "name": "w", "overwrite": True,
                    "description": "", "tags": []}),
    ),
    (["list"], ("list", LIST_DEFAULTS)),
    (
        ["list", "--tag", "x", "--session", "s1", "--search", "plan", "--model", "tiny",
         "--sort", "tokens", "--desc", "--limit", "3", "--offset", "1"],
        ("list", {"tags": ["x"], "model": "tiny", "session": "s1", "search": "plan",
                  "sort_by": "tokens", "sort_order": "desc", "limit": 3, "offset": 1}),
    ),
    (
        ["status", "w", "--cache-stats"],
        ("status", {"name": "w", "session": None, "include_cache_stats": True,
                    "include_lineage": True}),
    ),
    (
        ["status", "--session", DIGESTS["s1"], "--no-lineage"],
        ("status", {"name": None, "session": DIGESTS["s1"], "include_cache_stats": False,
                    "include_lineage": False}),
    ),
    (
        ["clone", "w", "b", "--salt", "s2", "--description", "branch", "--tag", "t"],
        ("clone", {"src": "w", "dst": "b", "salt": "s2", "description": "branch",
                   "tags": ["t"]}),
    ),
    (["clone", "w", "b"], ("clone", {"src": "w", "dst": "b", "salt": None, "description": "",
                                     "tags": []})),
    (["thaw", "w"], ("thaw", {"name": "w", "new_salt": None})),
    (["thaw", "w", "--new-salt", "s9"], ("thaw", {"name": "w", "new_salt": "s9"})),
    (["delete", "w"], ("delete", {"name": "w"})),
    (["stats"], ("stats", {})),
    (["sessions"], ("sessions", {"limit": 100, "reveal": False})),
    (["sessions", "--reveal", "--limit", "5"], ("sessions", {"limit": 5, "reveal": True})),
    (["metrics"], ("stats", {})),
    (["metrics", "--prometheus"], ("prometheus", {})),
    (["auto-freeze"], ("auto_freeze_config", {"update": None})),
    (["auto-freeze", "--disable"], ("auto_freeze_config", {"update": {"enabled": False}})),
    (
        ["auto-freeze", "--enable", "--threshold-tokens", "100", "--threshold-fraction", "0.5",
         "--cooldown", "30", "--keep-last", "2", "--name-pattern", "p-{n}", "--tag", "auto",
         "--tag", "x"],
        ("auto_freeze_config", {"update": {"enabled": True, "threshold_tokens": 100,
                                           "threshold_fraction": 0.5, "cooldown_s": 30.0,
                                           "keep_last": 2, "name_pattern": "p-{n}",
                                           "tags": ["auto", "x"]}}),
    ),
    (
        ["auto-freeze-check", "s1"],
        ("auto_freeze_check", {"session": "s1", "tokens": None, "trigger": False}),
    ),
    (
        ["auto-freeze-check", DIGESTS["s2"], "--tokens", "10", "--trigger"],
        ("auto_freeze_check", {"session": DIGESTS["s2"], "tokens": 10, "trigger": True}),
    ),
]  # fmt: skip


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("argv", "expected"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_arguments_map_to_the_op(
    served: tuple[Path, FakeConnector],
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    expected: tuple[str, dict[str, Any]],
) -> None:
    path, fake = served
    code, result, err = run_cli(capsys, path, *argv)
    assert (code, err) == (0, "")
    assert fake.calls == [expected]
    assert "error" not in (result if isinstance(result, dict) else {})


@pytest.mark.timeout(30)
def test_results_come_back_as_json(
    served: tuple[Path, FakeConnector], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = served
    _, frozen, _ = run_cli(capsys, path, "freeze", "s2", "a", "--tag", "x")
    assert (frozen["name"], frozen["salt"], frozen["tags"]) == ("a", "s2", ["x"])
    _, status, _ = run_cli(capsys, path, "status", "--session", "s1")
    assert status == {"session": DIGESTS["s1"], "tokens": 5, "updated": 1.7e9, "windows": ["w"]}
    _, prom, _ = run_cli(capsys, path, "metrics", "--prometheus")
    assert prom == {"text": PROMETHEUS_TEXT}
    _, check, _ = run_cli(capsys, path, "auto-freeze-check", "s1", "--trigger")
    assert check["reason"] == "triggered" and check["window"]["tags"] == ["auto"]
    _, sessions, _ = run_cli(capsys, path, "sessions", "--reveal")
    assert [(s["session"], s["salt"]) for s in sessions] == [
        (DIGESTS["s1"], "s1"), (DIGESTS["s2"], "s2")
    ]  # fmt: skip


@pytest.mark.timeout(30)
def test_human_output(
    served: tuple[Path, FakeConnector], capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = served
    fake.op_freeze("s2", "tagged", tags=["x", "y"])
    code, text, _ = run_cli(capsys, path, "list", as_json=False)
    assert code == 0 and "TAGS" in text.splitlines()[0] and "x,y" in text
    _, text, _ = run_cli(capsys, path, "metrics", "--prometheus", as_json=False)
    assert text == PROMETHEUS_TEXT
    _, text, _ = run_cli(capsys, path, "sessions", as_json=False)
    assert text.splitlines()[0].split() == ["SESSION", "TOKENS", "UPDATED", "WINDOWS"]
    assert DIGESTS["s2"] in text and "s2 " not in text
    _, text, _ = run_cli(capsys, path, "auto-freeze", as_json=False)
    assert "name_pattern: auto-{salt}-{n}" in text and "tags: auto" in text
    _, text, _ = run_cli(capsys, path, "auto-freeze-check", "s1", as_json=False)
    assert text.startswith(f"session {DIGESTS['s1']}: would not freeze")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["status", "w", "--session", "s1"],
        ["list", "--sort", "size"],
        ["auto-freeze", "--enable", "--disable"],
        ["thaw", "w", "--max-tokens", "0"],
        ["freeze", "s1"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_bad_usage_exits_2_without_a_call(
    served: tuple[Path, FakeConnector], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    path, fake = served
    with pytest.raises(SystemExit) as caught:
        cli.main([*argv, "--socket", str(path), "--json"])
    assert caught.value.code == 2
    assert fake.calls == [] and capsys.readouterr().out == ""


@pytest.mark.timeout(30)
def test_op_errors_exit_1_and_no_connector_exits_3(
    served: tuple[Path, FakeConnector], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = served
    code, result, _ = run_cli(capsys, path, "status", "nope")
    assert code == 1 and result["error"]["code"] == "window_not_found"
    code, result, _ = run_cli(capsys, path, "auto-freeze", "--keep-last", "1", "--tag", "t")
    assert code == 0 and result["keep_last"] == 1
    code, result, _ = run_cli(capsys, path, "freeze", "zz", "a")
    assert code == 1 and result == {
        "error": {"code": "unknown_session", "message": "no finished request with this salt",
                  "retryable": False}
    }  # fmt: skip
    code, _, err = run_cli(capsys, path, "delete", "nope", as_json=False)
    assert code == 1 and err.startswith("cwm: error window_not_found")
    missing = path.parent / "none.sock"
    for argv in (["sessions"], ["auto-freeze"], ["metrics", "--prometheus"]):
        code, result, _ = run_cli(capsys, missing, *argv)
        assert code == 3 and result["error"]["code"] == "unavailable", argv


@pytest.mark.timeout(30)
def test_thaw_warm_and_continue_through_vllm(
    served: tuple[Path, FakeConnector], vllm: FakeVllm, capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = served
    code, thawed, _ = run_cli(
        capsys, path, "thaw", "w", "--warm", "--continue", "Hi", "--max-tokens", "3",
        "--vllm-url", vllm.url,
    )  # fmt: skip
    assert code == 0 and fake.calls == [("thaw", {"name": "w", "new_salt": None})]
    assert thawed["token_ids"] == SESSION_TOKENS["s1"] and thawed["warmed"] is True
    assert thawed["reply"]["text"] == " next" and thawed["reply"]["token_ids"] == [7, 8]
    ids = SESSION_TOKENS["s1"]
    assert vllm.posts("/tokenize") == [
        {"model": "tiny-llama", "prompt": "Hi", "add_special_tokens": False}
    ]
    assert vllm.posts("/v1/completions") == [
        {"model": "tiny-llama", "prompt": ids, "max_tokens": 1, "cache_salt": "s1"},
        {"model": "tiny-llama", "prompt": [*ids, ord("H"), ord("i")], "max_tokens": 3,
         "temperature": 0.0, "logprobs": 1, "cache_salt": "s1", "return_token_ids": True},
    ]  # fmt: skip
    code, text, _ = run_cli(
        capsys, path, "thaw", "w", "--continue", "x", "--vllm-url", vllm.url, as_json=False
    )
    assert code == 0 and "reply (length):  next" in text and "warmed" not in text
    vllm.completion_status = 400
    code, result, _ = run_cli(capsys, path, "thaw", "w", "--warm", "--vllm-url", vllm.url)
    assert code == 1 and result["error"]["code"] == "vllm_unavailable"
    assert result["error"]["retryable"] is False
    code, result, _ = run_cli(capsys, path, "thaw", "w", "--warm", "--vllm-url", closed_url())
    assert code == 3 and result["error"]["code"] == "vllm_unavailable"
    assert result["error"]["message"].startswith("window 'w' is thawed (salt 's1') but GET ")


@pytest.mark.timeout(30)
def test_health_exit_codes(
    served: tuple[Path, FakeConnector], vllm: FakeVllm, capsys: pytest.CaptureFixture[str]
) -> None:
    path, fake = served
    code, report, _ = run_cli(capsys, path, "health", "--vllm-url", vllm.url)
    assert code == 0 and report["ok"] is True and "error" not in report
    assert set(report["components"]) == {"store", "disk", "redis", "control_socket", "vllm"}
    code, report, _ = run_cli(capsys, path, "health", "--vllm-url", closed_url())
    assert code == 1 and report["ok"] is False
    assert report["error"] == {"code": "unhealthy", "message": "unhealthy: vllm",
                               "retryable": True}  # fmt: skip
    code, text, _ = run_cli(capsys, path, "health", "--vllm-url", vllm.url, as_json=False)
    assert code == 0 and [line.split()[:2] for line in text.splitlines()] == [
        ["store", "ok"], ["disk", "ok"], ["redis", "ok"], ["control_socket", "ok"], ["vllm", "ok"]
    ]  # fmt: skip
    code, report, _ = run_cli(capsys, path.parent / "none.sock", "health", "--vllm-url", vllm.url)
    assert code == 3 and report["components"]["control_socket"]["error"]["code"] == "unavailable"
    assert fake.calls == [("health", {})] * 3


@pytest.mark.timeout(60)
def test_json_stdout_is_one_document_in_a_subprocess(served: tuple[Path, FakeConnector]) -> None:
    path, _ = served
    proc = subprocess.run(
        [sys.executable, "-m", "cwm_connector.cli", "list", "--tag", "x", "--json",
         "--socket", str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [w["name"] for w in json.loads(proc.stdout)] == ["w"]


def test_mcp_subcommand_forwards_socket_and_vllm_url(monkeypatch: pytest.MonkeyPatch) -> None:
    import cwm_mcp.server

    seen: list[list[str]] = []
    monkeypatch.setattr(cwm_mcp.server, "main", lambda argv: seen.append(list(argv)) or 0)
    argv = ["mcp", "--socket", "/tmp/c.sock", "--vllm-url", "http://h:1", "--http", "9000"]
    assert cli.main(argv) == 0
    assert seen == [
        ["--socket", "/tmp/c.sock", "--vllm-url", "http://h:1", "--http", "9000",
         "--host", "127.0.0.1"]
    ]  # fmt: skip
