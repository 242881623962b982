"""The rendezvous store's two modes: hosted here, or a client of ``salamander rendezvous``, and
the ``salamander rendezvous`` command's usage errors."""

from __future__ import annotations

import logging
import time

import pytest

from salamander import cli, wire
from salamander_operator.rendezvous import (RendezvousClient, RendezvousError, RendezvousHost, RendezvousStore,
                                            parse_endpoint)
from tests.unit._support import one_line


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _progress(step: int) -> bytes:
    return wire.Progress(step=step, samples=step * 8, world_size=2, time=time.time()).encode()


@pytest.fixture
def host() -> RendezvousHost:
    return RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")


@pytest.mark.parametrize("text, expected", [("rdzv:29400", ("rdzv", 29400)), ("10.0.0.5:1", ("10.0.0.5", 1)),
                                            ("[fd00::5]:29400", ("fd00::5", 29400)),
                                            ("salamander-rendezvous.ops.svc:65535",
                                             ("salamander-rendezvous.ops.svc", 65535))])
def test_parse_endpoint(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["", "rdzv", "rdzv:", ":29400", "rdzv:0", "rdzv:65536", "rdzv:x", "fd00::5:29400",
                                  "a b:1", "rdzv:-1", "[]:1"])
def test_parse_endpoint_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        parse_endpoint(text)


def test_both_modes_are_rendezvous_stores(host: RendezvousHost) -> None:
    stores: list[RendezvousStore] = [host, RendezvousClient(host.endpoint)]
    assert [s.endpoint for s in stores] == [host.endpoint, host.endpoint]
    assert RendezvousClient("10.0.0.5:29400", advertise="rdzv.ops.svc:29400").endpoint == "rdzv.ops.svc:29400"


def test_the_client_reads_writes_and_forgets(host: RendezvousHost) -> None:
    client = RendezvousClient(host.endpoint)
    assert client.read_progress("run") is None
    host._store.set(wire.progress_key("run"), _progress(7))
    progress = client.read_progress("run")
    assert progress is not None and progress.step == 7
    client.request_stop("run")
    assert host._store.get(wire.stop_key("run")) == b"1"
    client.forget("run")
    assert host.read_progress("run") is None and not host._store.check([wire.stop_key("run")])


def test_a_malformed_record_is_none_and_keeps_the_connection(host: RendezvousHost) -> None:
    client = RendezvousClient(host.endpoint)
    host._store.set(wire.progress_key("run"), b"{not json")
    assert client.read_progress("run") is None
    host._store.set(wire.progress_key("run"), _progress(3))
    assert client.read_progress("run").step == 3  # type: ignore[union-attr]


def test_an_unreachable_store_is_a_clear_error_never_a_crash(host: RendezvousHost,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    port = host.port
    host.close()  # nothing listens there any more
    clock = Clock()
    client = RendezvousClient(f"127.0.0.1:{port}", timeout_s=0.2, clock=clock)
    with caplog.at_level(logging.WARNING, logger="salamander_operator.rendezvous"):
        assert client.read_progress("run") is None  # progress unknown, no exception
    assert any(f"127.0.0.1:{port}" in r.getMessage() for r in caplog.records)
    started = time.monotonic()
    with pytest.raises(RendezvousError, match=f"rendezvous store at 127.0.0.1:{port} is unreachable"):
        client.request_stop("run")  # within the backoff window: at once, without dialling
    client.forget("run")  # best effort: logs, does not raise
    assert client.read_progress("run") is None
    assert time.monotonic() - started < 0.5
    clock.now += 1.0  # past the backoff: dials again, fails again, with the endpoint in the message
    with pytest.raises(RendezvousError, match=f"cannot connect to the rendezvous store at 127.0.0.1:{port}"):
        client.connect()


def test_the_client_reconnects_to_a_store_that_came_back() -> None:
    first = RendezvousHost(advertise_host="127.0.0.1", port=0, bind_host="127.0.0.1")
    port = first.port
    clock = Clock()
    client = RendezvousClient(f"127.0.0.1:{port}", timeout_s=1.0, clock=clock)
    client.connect()
    first.close()
    assert client.read_progress("run") is None  # the broken connection is dropped
    second = RendezvousHost(advertise_host="127.0.0.1", port=port, bind_host="127.0.0.1")
    second._store.set(wire.progress_key("run"), _progress(11))
    assert client.read_progress("run") is None  # still backing off
    clock.now += 60.0
    assert client.read_progress("run").step == 11  # type: ignore[union-attr]
    second.close()


def test_the_host_binds_where_told_and_refuses_a_port_in_use(host: RendezvousHost) -> None:
    with pytest.raises(RendezvousError, match=f"127.0.0.1:{host.port}"):
        RendezvousHost(advertise_host="127.0.0.1", port=host.port, bind_host="127.0.0.1")


# --- salamander rendezvous / operator flags ------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["--port", "x"], "--port must be a number from 0 to 65535"),
    (["--port", "70000"], "--port must be a number from 0 to 65535"),
    (["--port", "-1"], "--port must be a number from 0 to 65535"),
    (["--port", ""], "--port must be a number from 0 to 65535"),
    (["--port", "29\n400"], "--port must be a number from 0 to 65535"),
    (["--port", "0", "--bind", ""], "--bind must be an address"),
    (["--port", "0", "--bind", "no-such-host.invalid"], "no-such-host.invalid"),
])
def test_rendezvous_usage_errors_exit_2_with_one_line(argv: list[str], needle: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rendezvous", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n") and one_line(captured.err.removesuffix("\n")), repr(captured.err)
    assert captured.err.startswith("salamander: rendezvous: ") and needle in captured.err


def test_rendezvous_on_a_port_in_use_exits_2(host: RendezvousHost, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rendezvous", "--port", str(host.port), "--bind", "127.0.0.1"]) == 2
    err = capsys.readouterr().err
    assert one_line(err.removesuffix("\n")) and "Address already in use" in err and str(host.port) in err


def test_the_operator_connects_to_an_external_store_and_advertises_it() -> None:
    from salamander_operator.kube.main import open_rendezvous

    store, control_host = open_rendezvous(29400, "operator.ops.svc", "rdzv.ops.svc:29400")
    assert isinstance(store, RendezvousClient) and store.endpoint == "rdzv.ops.svc:29400"
    assert control_host == "operator.ops.svc"  # --advertise names the operator, for the control plane
    store, _ = open_rendezvous(29400, "operator.ops.svc:29400", "127.0.0.1:29400", "rdzv.ops.svc:29400")
    assert isinstance(store, RendezvousClient) and store.endpoint == "rdzv.ops.svc:29400"
    assert store.target == "127.0.0.1:29400"
    store, _ = open_rendezvous(0, "operator.ops.svc:29400")  # no endpoint: hosted here, as before
    assert isinstance(store, RendezvousHost) and store.endpoint == "operator.ops.svc:29400"
    store.close()


@pytest.mark.parametrize("endpoint, advertise", [("rdzv", None), ("rdzv:0", None), ("rdzv:29400", "nope"),
                                                 (None, "rdzv:29400")])
def test_the_operator_rejects_a_bad_rendezvous_endpoint(endpoint: str | None, advertise: str | None) -> None:
    from salamander_operator.kube.main import open_rendezvous, run_operator

    with pytest.raises(ValueError):
        open_rendezvous(0, "operator", endpoint, advertise)
    assert run_operator([], True, 0, "operator", None, False, 0, rendezvous_endpoint=endpoint,
                        rendezvous_advertise=advertise) == 2
