"""The built-in VICI client: what strongSwan's own client reads, and nothing worse on bad input.

On the live daemon its answers must equal those of strongSwan's `vici` package (a test-only
dependency); against a fake socket, any stream of bytes ends as a DaemonError (a failed run),
never a hang or another exception.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ipsec_textfile as it
import lab
from conftest import FIXTURES, FakeVici, executable, require, vici_answer, vici_packets

# Fields that move between two queries of one daemon: clocks and traffic.
MOVING = {"established", "rekey-time", "reauth-time", "life-time", "install-time", "bytes-in", "bytes-out",
          "packets-in", "packets-out", "use-in", "use-out"}


def plain(value: Any) -> Any:
    """The vici package's answer (bytes in ordered dicts) as str, dict and list, moving fields out."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k if isinstance(k, str) else k.decode(): plain(v) for k, v in value.items() if k not in MOVING}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def reference_answer(socket_path: str) -> dict[str, Any]:
    """The same queries through strongSwan's own Python client."""
    require([] if importlib.util.find_spec("vici") else ["the vici package (pip install '.[test]')"],
            "the comparison with strongSwan's own client")
    import vici
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    try:
        session = vici.Session(sock)
        return {
            "version": session.version(),
            "list-sas": list(session.list_sas()),
            "list-policies": list(session.list_policies({"trap": "yes", "pass": "yes", "drop": "yes"})),
            "list-conns": list(session.list_conns()),
        }
    finally:
        sock.close()


def test_live_answers_equal_strongswans_own_client(states_lab: lab.Lab) -> None:
    ours = it.ViciDaemon(states_lab.gateway.vici_socket).send_questions(time.monotonic() + 10)()
    theirs = reference_answer(states_lab.gateway.vici_socket)
    for command, answer in theirs.items():
        assert plain(ours[command]) == plain(answer), command
    assert len(ours["list-sas"]) >= 3 and ours["version"]["version"] == "5.9.8"
    # stats has the same shape (its figures move)
    assert set(ours["stats"]) == set(ours["stats-after"]) >= {"uptime", "ikesas", "workers"}


VICI_RESPONSE, VICI_EVENT = 1, 7  # the packet types that carry a message (charon's vici README)


def fixture_bodies() -> list[bytes]:
    """Every message a real charon sent in the captured conversations, as its bytes."""
    bodies = []
    for name in ("states", "swanctl", "rekeyed"):
        for packet in vici_packets(FIXTURES / name):
            if packet[0] == VICI_RESPONSE:
                bodies.append(packet[1:])
            elif packet[0] == VICI_EVENT:
                bodies.append(packet[2 + packet[1]:])  # after the event's name
    return bodies


def test_every_message_charon_sent_decodes_and_encodes_back_to_its_bytes() -> None:
    bodies = fixture_bodies()
    assert len(bodies) > 20
    for body in bodies:
        assert it.vici_encode(it.vici_decode(body)) == body


def test_the_captured_conversation_reads_as_what_charon_was_asked() -> None:
    # Decoded from the raw bytes by the client itself: one IKE SA per list-sas event, and the
    # daemon's own count of them agrees.
    answer = vici_answer(FIXTURES / "states")
    assert answer["version"]["daemon"] == "charon" and answer["version"]["version"] == "5.9.8"
    assert sorted(name for event in answer["list-sas"] for name in event) == ["connecting", "ike", "up"]
    assert int(answer["stats"]["ikesas"]["total"]) == len(answer["list-sas"])
    children = {c["name"] for event in answer["list-sas"] for sa in event.values()
                for c in sa.get("child-sas", {}).values()}
    assert children == {"up", "site", "a.b_c-d", "included", "alsoconn"}


@pytest.mark.parametrize(("data", "why"), [
    (b"\x03\x03key\x00\x05val", "ends inside an element"),  # short value
    (b"\x03\x09key", "ends inside an element"),  # short name
    (b"\x04\x01l\x05\x00", "ends inside an element"),  # list item without its length
    (b"\x01\x01a\x03\x01k\x00\x01v", "ends inside a list or section"),  # section never closed
    (b"\x02", "section end without a section"),
    (b"\x05\x00\x01v", "element type 5 where"),  # list item outside a list
    (b"\x04\x01l\x03\x01k\x00\x01v\x06", "element type 3 inside a list"),
    (b"\x09", "element type 9"),
    (b"\x01\x01a" * 40 + b"\x02" * 40, "nested deeper than 32"),
])
def test_malformed_messages_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(it.ViciError, match=why):
        it.vici_decode(data)


# No per-example deadline: what is tested is the outcome, not the speed; hypothesis' 200 ms
# default fails a loaded machine at random.
@settings(deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_vici_error(data: bytes) -> None:
    try:
        assert isinstance(it.vici_decode(data), dict)
    except it.ViciError:
        pass


@settings(deadline=None)  # as above
@given(st.sampled_from(fixture_bodies()), st.data())
def test_mutated_real_messages_decode_or_raise_vici_error(body: bytes, data: st.DataObject) -> None:
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip" and raw:
            raw[at] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        it.vici_decode(bytes(raw))
    except it.ViciError:
        pass


def packet(kind: int, body: bytes = b"", name: str = "") -> bytes:
    named = bytes([len(name)]) + name.encode() if name else b""
    payload = bytes([kind]) + named + body
    return len(payload).to_bytes(4, "big") + payload


@pytest.mark.parametrize(("reply", "why"), [
    (b"\x00\x10\x00\x00", "announced a packet of 1048576 bytes"),  # past charon's 512 KiB
    (b"\x00\x00\x00\x00", "announced a packet of 0 bytes"),
    (packet(1, b"\x07\x00"), "element type 7"),
    (packet(9), "unknown type 9"),
    (packet(2), "does not know the command version"),
    (packet(7, name="list-sa"), "answered version with a packet of type 7"),
    (b"\x00\x00\x00\x10\x01", "did not answer within 1s"),  # stalls mid-packet
    (b"", "did not answer within 1s"),  # silent
])
def test_a_bad_daemon_is_a_daemon_error(tmp_path: Path, reply: bytes, why: str) -> None:
    fake = FakeVici(tmp_path / "charon.vici", reply)
    try:
        started = time.monotonic()
        with pytest.raises(it.DaemonError, match=why):
            it.ViciDaemon(str(tmp_path / "charon.vici"), timeout=1).ask()()
        # A fault bound, not a speed: the 1 s timeout ends it; a client that waited for the
        # stalled socket would not return; 8 s is what a loaded 2-core machine keeps.
        assert time.monotonic() - started < 8
    finally:
        fake.close()


def test_one_deadline_covers_the_whole_conversation(tmp_path: Path) -> None:
    # A daemon that announces a packet, then trickles it one byte every 0.1 s: every read
    # gets something well within the timeout, the whole answer never comes. One deadline
    # for the conversation ends it after 1 s; a timeout per read would wait 100 s.
    fake = FakeVici(tmp_path / "charon.vici", b"\x00\x00\x03\xe8\x01", trickle=0.1)
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            it.ViciDaemon(str(tmp_path / "charon.vici"), timeout=1).ask()()
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            outcome.append(e)

    try:
        asking = threading.Thread(target=ask, daemon=True)
        asking.start()
        # 1 s of deadline, and a margin a loaded 2-core machine keeps; far below the 100 s.
        asking.join(timeout=20)
        assert not asking.is_alive(), "still reading a trickle after 20 s"
    finally:
        fake.close()
    (error,) = outcome
    assert isinstance(error, it.DaemonError) and "did not answer within 1s" in str(error)


@pytest.mark.parametrize("reads_first", [True, False])
def test_a_daemon_that_hangs_up_with_questions_unread_is_a_hang_up(tmp_path: Path, reads_first: bool) -> None:
    # The questions go out at once; a daemon that reads one byte of them, starts an answer and
    # closes leaves the rest unread, so the kernel resets the connection instead of ending it;
    # one that hangs up at once may do so before the questions are written (a broken pipe).
    # The same failure as a plain hang-up, said the same way.
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "charon.vici"))
    server.listen(1)

    def hang_up() -> None:
        client, _ = server.accept()
        if reads_first:
            client.recv(1)
            time.sleep(0.2)  # the rest of the questions arrive, unread
            client.sendall(b"\x00\x00\x00\x64\x01")
        client.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with pytest.raises(it.DaemonError, match="closed the connection in the middle of an answer"):
            it.ViciDaemon(str(tmp_path / "charon.vici"), timeout=10).ask()()
    finally:
        server.close()


def test_ipsec_leases_gets_what_is_left_of_the_one_deadline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # charon answers over VICI after 3 s of a 4 s timeout, and `ipsec leases` (for ipsec.conf's
    # pools) hangs. It runs beside the VICI conversation and is killed at the run's deadline:
    # 4 s in all, where a timeout of its own would make it 3 + 4 s.
    sock, stroke_socket = tmp_path / "charon.vici", tmp_path / "charon.ctl"
    stroke_socket.touch()
    ipsec = executable(tmp_path / "ipsec", "#!/bin/sh\nexec sleep 60\n")
    fake = FakeVici(sock, (FIXTURES / "remote-access" / "vici.bin").read_bytes(), delay=3)
    try:
        started = time.monotonic()
        state = it.ViciDaemon(str(sock), 4, it.StrokePools(str(ipsec), str(stroke_socket))).ask()()
        elapsed = time.monotonic() - started
    finally:
        fake.close()
    # A fault bound, not a speed: 4 s, and a margin a loaded 2-core machine keeps, below 7 s.
    assert 3 <= elapsed < 6.5
    # VICI's own pool and every IKE SA are kept; ipsec.conf's pools are left out, with a warning.
    assert [pool.name for pool in state.pools] == ["swan-pool"]
    assert len(state.ike_sas) == 11
    assert "ipsec leases` did not answer within 4s; ipsec.conf's address pools left out" in capsys.readouterr().err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=st.binary(max_size=64))
def test_any_reply_from_the_socket_is_a_daemon_error(tmp_path: Path, reply: bytes) -> None:
    path = tmp_path / f"charon-{time.monotonic_ns()}.vici"
    fake = FakeVici(path, reply)
    try:
        with pytest.raises(it.DaemonError):
            it.ViciDaemon(str(path), timeout=0.2).ask()()
    finally:
        fake.close()
        path.unlink()
