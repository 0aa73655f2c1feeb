"""Slot and reservation accounting of the SIP plane (gateway/sip/placement.py): pure, no I/O."""

from __future__ import annotations

import pytest

from gateway.sip.placement import Placement, Refusal, Reservation

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
    assert Placement(1, 2).footprint("leg") == 2  # never more than a worker holds


def test_best_fit_fills_a_worker_before_using_an_idle_one() -> None:
    p = Placement(3, 4)
    first = reserved(p.reserve("a", "siprec", {"agent", "customer"}, ALL, 0.0))
    second = reserved(p.reserve("b", "siprec", {"agent", "customer"}, ALL, 0.0))
    assert first.worker == second.worker and p.free(first.worker) == 0
    third = reserved(p.reserve("c", "leg", {"agent"}, ALL, 0.0))
    assert third.worker != first.worker
    # A SIPREC conversation (2 calls) does not fit next to a per-leg one (3): the third worker.
    fourth = reserved(p.reserve("d", "siprec", {"agent", "customer"}, ALL, 0.0))
    assert fourth.worker not in {first.worker, third.worker}
    assert p.reserve("e", "leg", {"agent"}, ALL, 0.0) is Refusal.NO_CAPACITY
    assert [p.free(w) for w in (first.worker, third.worker, fourth.worker)] == [0, 1, 2] and p.fits_new()
    assert reserved(p.reserve("f", "siprec", {"agent", "customer"}, ALL, 0.0)).worker == fourth.worker
    assert not p.fits_new()


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
