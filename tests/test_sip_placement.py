"""Slot and reservation accounting of the SIP plane (gateway/sip/placement.py): pure, no I/O."""

from __future__ import annotations

import pytest

from gateway.sip.placement import Placement, Refusal, Reservation
from gateway.sip.protocol import TOKEN_LENGTH, WorkerArgs, mint_token, new_token_key, token_valid

pytestmark = [pytest.mark.unit]

ALL = {0, 1, 2}


def reserved(result: Reservation | Refusal) -> Reservation:
    assert isinstance(result, Reservation), result
    return result


def test_footprints_include_the_phone_slot() -> None:
    p = Placement(1, 4)
    assert (p.footprint("leg"), p.footprint("siprec")) == (3, 2)
    q = Placement(1, 4, reserve_phone_slot=False)
    assert (q.footprint("leg"), q.footprint("siprec")) == (2, 1)
    assert Placement(1, 2).footprint("leg", 0) == 2  # never more than worker 0 holds


def test_new_conversations_go_to_the_least_loaded_worker() -> None:
    p = Placement(3, 4)
    first = reserved(p.reserve("a", "siprec", {"agent", "customer"}, ALL, 0.0))
    second = reserved(p.reserve("b", "siprec", {"agent", "customer"}, ALL, 0.0))
    third = reserved(p.reserve("c", "leg", {"agent"}, ALL, 0.0))
    assert [first.worker, second.worker, third.worker] == [0, 1, 2]  # not worker 0 first
    # Worker 2 holds a per-leg footprint (3 of 4): a SIPREC one (2) fits only on 0 or 1.
    fourth = reserved(p.reserve("d", "siprec", {"agent", "customer"}, ALL, 0.0))
    assert fourth.worker == 0 and [p.free(w) for w in range(3)] == [0, 2, 1]
    assert reserved(p.reserve("e", "siprec", {"agent", "customer"}, ALL, 0.0)).worker == 1
    assert p.reserve("f", "leg", {"agent"}, ALL, 0.0) is Refusal.NO_CAPACITY
    assert not p.fits_new()


def test_capacity_is_what_each_worker_reported() -> None:
    p = Placement(2, 0)
    assert p.reserve("a", "leg", {"agent"}, {0, 1}, 0.0) is Refusal.NO_CAPACITY  # nobody reported yet
    assert not p.fits_new()
    p.set_capacity(0, 512)
    p.set_capacity(1, 4)  # a worker on the PyPI wheel
    workers = [reserved(p.reserve(f"c{i}", "leg", {"agent"}, {0, 1}, 0.0)).worker for i in range(100)]
    # Shares of load, not counts: the 4-call worker takes one conversation, the other the rest.
    assert workers.count(1) == 1 and workers.count(0) == 99
    assert p.free(0) == 512 - 99 * 3 and p.free(1) == 1


def test_hundreds_of_conversations_spread_evenly() -> None:
    p = Placement(2, 512)
    for i in range(200):
        reserved(p.reserve(f"c{i}", "siprec", {"agent", "customer"}, {0, 1}, 0.0))
    assert p.free(0) == p.free(1) == 512 - 100 * 2


def test_placement_tokens_are_checked_by_the_worker_alone() -> None:
    key, other = new_token_key(), new_token_key()
    token = mint_token(key)
    assert token_valid(key, token) and len(token) == TOKEN_LENGTH
    assert not token_valid(other, token)  # another worker's
    assert mint_token(key) != token  # one-time: a fresh nonce each
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    for bad in (forged, "", "gateway", "t" + "0" * (TOKEN_LENGTH - 1), token + "0", "x" + token[1:], "té" * 17):
        assert not token_valid(key, bad), bad
    assert not token_valid("", token)


def test_a_workers_token_key_travels_in_its_environment_not_its_command_line() -> None:
    key = new_token_key()
    args = WorkerArgs(ctl_fd=5, frame_fd=6, sip_port=5061, token_key=key)
    assert key not in " ".join(args.argv())  # /proc/<pid>/cmdline is readable by every local user
    assert WorkerArgs.parse(args.argv(), args.env()) == args


def test_legs_of_a_conversation_follow_it() -> None:
    p = Placement(2, 4)
    agent = reserved(p.reserve("a", "leg", {"agent"}, {0, 1}, 0.0))
    customer = reserved(p.reserve("a", "leg", {"customer"}, {0, 1}, 0.0))
    assert agent.worker == customer.worker and agent.token != customer.token
    assert p.reserve("a", "leg", {"agent"}, {0, 1}, 0.0) is Refusal.LEG_TAKEN  # on its way already
    assert p.reserve("a", "siprec", {"agent", "customer"}, {0, 1}, 0.0) is Refusal.LEG_TAKEN  # other style
    p.expire(100.0)
    reserved(p.reserve("b", "leg", {"agent"}, {0, 1}, 100.0))
    assert p.reserve("b", "leg", {"customer"}, set(), 100.0) is Refusal.WORKER_RESTARTING


def test_new_conversations_go_only_to_ready_workers() -> None:
    p = Placement(2, 4)
    assert reserved(p.reserve("a", "leg", {"agent"}, {1}, 0.0)).worker == 1
    assert p.reserve("b", "leg", {"agent"}, {1}, 0.0) is Refusal.NO_CAPACITY


def test_a_reservation_is_claimed_once_on_its_worker_before_it_expires() -> None:
    p = Placement(2, 4, reservation_seconds=8.0)
    res = reserved(p.reserve("a", "leg", {"agent"}, {0, 1}, 10.0))
    assert p.reservation(res.token, 1 - res.worker, 11.0) is None  # another worker
    assert p.reservation(res.token, res.worker, 18.5) is None  # expired
    assert p.reservation("t-forged", res.worker, 11.0) is None
    assert p.reservation(res.token, res.worker, 11.0) == res
    conv = p.admit(res, 7, ["agent"])
    assert conv is not None and conv.calls == {7: ["agent"]} and not conv.tokens
    assert p.reservation(res.token, res.worker, 11.0) is None  # one-time
    assert p.leg_up(res.worker, 7, "a", "agent") is conv and conv.legs == {"agent": 7} and not conv.expected
    assert p.leg_up(res.worker, 7, "a", "agent") is None  # not news
    assert p.calls_on(res.worker) == 1 and p.legs == 1
    # the worker reports a re-INVITE's new codec again: still not news, the codec follows
    assert p.leg_up(res.worker, 7, "a", "agent", "g722") is None and conv.codecs == {"agent": "g722"}
    assert p.leg_up(res.worker, 8, "a", "agent", "pcmu") is None and conv.codecs == {"agent": "g722"}  # another call


def test_expiry_releases_what_a_reservation_held() -> None:
    p = Placement(1, 4, reservation_seconds=2.0)
    reserved(p.reserve("a", "leg", {"agent"}, {0}, 0.0))
    p.expire(1.0)
    assert "a" in p.conversations and len(p.reservations) == 1
    p.expire(2.5)
    assert not p.conversations and not p.reservations and p.free(0) == 4


def test_slots_return_when_the_last_call_and_the_phone_are_gone() -> None:
    p = Placement(1, 4)
    res = reserved(p.reserve("a", "siprec", {"agent", "customer"}, {0}, 0.0))
    conv = p.admit(res, 1, ["customer", "agent"])
    assert conv is not None
    p.leg_up(0, 1, "a", "customer")
    p.leg_up(0, 1, "a", "agent")
    p.add_phone("a", "m-1")
    assert p.calls_on(0) == 2 and p.phones == {"m-1": "a"}
    ended = p.call_ended(0, 1)
    assert ended is not None and ended[1] == ["customer", "agent"] and not conv.legs
    p.release_if_idle(conv)
    assert "a" in p.conversations, "the phone still holds the conversation"
    assert p.phone_gone("m-1") == "a"
    assert not p.conversations and not p.phones and p.free(0) == 4
    assert p.call_ended(0, 1) is None and p.phone_gone("m-1") is None


def test_without_the_phone_slot_a_phone_needs_room() -> None:
    p = Placement(1, 4, reserve_phone_slot=False)
    for cid in ("a", "b"):
        res = reserved(p.reserve(cid, "leg", {"agent", "customer"}, {0}, 0.0))
        p.admit(res, ord(cid), ["agent", "customer"])
    assert p.free(0) == 0 and not p.phone_fits("a") and not p.fits_new()
    assert Placement(1, 4).phone_fits("a") is False  # unknown conversation


def test_a_dead_worker_drops_only_its_conversations() -> None:
    p = Placement(2, 4)
    a = reserved(p.reserve("a", "leg", {"agent"}, {0, 1}, 0.0))
    b = reserved(p.reserve("b", "leg", {"agent"}, {0, 1}, 0.0))
    assert a.worker != b.worker
    p.admit(a, 1, ["agent"])
    p.leg_up(a.worker, 1, "a", "agent")
    p.add_phone("a", "m-1")
    reserved(p.reserve("a", "leg", {"customer"}, {0, 1}, 0.0))
    dropped = p.drop_worker(a.worker)
    assert [c.cid for c in dropped] == ["a"] and dropped[0].legs == {"agent": 1} and dropped[0].phone == "m-1"
    assert set(p.conversations) == {"b"} and set(p.reservations) == {b.token} and not p.phones
