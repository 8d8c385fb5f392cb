"""Bybit's subscription protocol, without a socket: requests out, replies in, topics kept equal."""

from __future__ import annotations

import hashlib
import hmac

import orjson

from streaming.protocol import ARGS_PER_REQUEST, AuthReply, Overdue, Request, Subscriptions, auth_reply, auth_request


def ack(request: Request, success: bool = True, ret_msg: str = "subscribe", echo: bool = True) -> dict:
    """Bybit's reply to `request`, as the simulator sends it."""
    return {"success": success, "ret_msg": ret_msg, "op": request.op, **({"req_id": request.req_id} if echo else {})}


def subscribed(core: Subscriptions, topics: set[str], now: float = 0.0) -> list[Request]:
    """Want `topics` and have Bybit accept every request; return the requests."""
    core.want(topics)
    requests = core.sync(now)
    for request in requests:
        core.reply(ack(request), now)
    return requests


def test_topics_are_requested_sorted_in_batches_of_ten() -> None:
    core = Subscriptions()
    topics = {f"publicTrade.SYM{i:02d}USDT" for i in range(23)}
    core.want(topics)
    requests = core.sync(0.0)
    assert [len(r.topics) for r in requests] == [ARGS_PER_REQUEST, ARGS_PER_REQUEST, 3]
    assert [t for r in requests for t in r.topics] == sorted(topics)
    assert len({r.req_id for r in requests}) == 3
    wire = orjson.loads(requests[0].text())
    assert wire == {"req_id": requests[0].req_id, "op": "subscribe", "args": sorted(topics)[:10]}


def test_want_sends_the_difference_and_never_rerequests_what_is_in_flight() -> None:
    core = Subscriptions()
    subscribed(core, {"a", "b"})
    core.want({"b", "c"})
    first = core.sync(1.0)
    assert [(r.op, r.topics) for r in first] == [("subscribe", ("c",)), ("unsubscribe", ("a",))]
    core.want({"b", "c", "d"})
    assert [(r.op, r.topics) for r in core.sync(2.0)] == [("subscribe", ("d",))]
    assert core.sync(3.0) == []


def test_an_ack_makes_topics_live_and_reports_the_wanted_ones() -> None:
    core = Subscriptions()
    core.want({"a", "b"})
    (request,) = core.sync(0.0)
    outcome = core.reply(ack(request), 0.1)
    assert outcome.acked == ("a", "b")
    assert core.live == {"a", "b"}
    assert not outcome.sync
    assert core.reply(ack(request), 0.2).acked == ()  # a reply nobody waits for changes nothing


def test_already_subscribed_counts_as_live() -> None:
    core = Subscriptions()
    core.want({"a"})
    (request,) = core.sync(0.0)
    outcome = core.reply(ack(request, False, "error:already subscribed,topic:a"), 0.1)
    assert outcome.acked == ("a",)
    assert outcome.rejected == ()
    assert core.live == {"a"}


def test_a_refusal_naming_one_topic_rejects_it_and_retries_the_rest_one_by_one() -> None:
    core = Subscriptions()
    core.want({"a", "bad", "c"})
    (request,) = core.sync(0.0)
    message = "error:handler not found,topic:bad"
    outcome = core.reply(ack(request, False, message), 0.1)
    assert outcome.rejected == (("bad", message),)
    assert [(r.op, r.topics) for r in outcome.send] == [("subscribe", ("a",)), ("subscribe", ("c",))]
    assert core.desired == {"a", "c"}
    assert core.sync(0.2) == []  # the retries are in flight
    for retry in outcome.send:
        core.reply(ack(retry), 0.3)
    assert core.live == {"a", "c"}


def test_a_refused_batch_naming_no_topic_is_retried_one_by_one() -> None:
    core = Subscriptions()
    core.want({"a", "b"})
    (request,) = core.sync(0.0)
    outcome = core.reply(ack(request, False, "args size >10"), 0.1)
    assert outcome.rejected == ()
    assert [r.topics for r in outcome.send] == [("a",), ("b",)]


def test_a_refusal_of_a_single_topic_rejects_it() -> None:
    core = Subscriptions()
    core.want({"a"})
    (request,) = core.sync(0.0)
    outcome = core.reply(ack(request, False, "args size >10"), 0.1)
    assert outcome.rejected == (("a", "args size >10"),)
    assert outcome.send == ()
    assert core.desired == set()
    assert core.sync(0.2) == []


def test_replies_without_req_id_match_requests_in_order() -> None:
    core = Subscriptions()
    core.want({f"order.{i:02d}" for i in range(12)})
    first, second = core.sync(0.0)
    assert core.reply(ack(first, ret_msg="", echo=False), 0.1).acked == first.topics
    assert core.reply(ack(second, ret_msg="", echo=False), 0.2).acked == second.topics
    assert core.in_flight == {}


def test_a_repair_unsubscribes_then_resubscribes_the_topic() -> None:
    core = Subscriptions()
    subscribed(core, {"book", "other"})
    (repair,) = core.repair(["book", "not-live"], 1.0)
    assert (repair.op, repair.topics) == ("unsubscribe", ("book",))
    assert core.repair(["book"], 1.0) == []  # already being unsubscribed
    outcome = core.reply(ack(repair, ret_msg="unsubscribe"), 1.1)
    assert outcome.sync
    assert core.live == {"other"}
    (again,) = core.sync(1.2)
    assert (again.op, again.topics) == ("subscribe", ("book",))
    assert core.reply(ack(again), 1.3).acked == ("book",)


def test_many_repairs_at_once_go_ten_topics_a_request_and_all_come_back() -> None:
    core = Subscriptions()
    books = {f"orderbook.50.SYM{i:04d}USDT" for i in range(25)}
    subscribed(core, books | {"tickers.BTCUSDT"})
    assert [core.ask_repair(t) for t in sorted(books)] == [True] + [False] * 24  # one send for them all
    repairs = core.repair_asked(1.0)
    assert [len(r.topics) for r in repairs] == [10, 10, 5]
    assert {t for r in repairs for t in r.topics} == books
    for repair in repairs:
        assert core.reply(ack(repair, ret_msg="unsubscribe"), 1.1).sync
    again = core.sync(1.2)
    assert all(r.op == "subscribe" and len(r.topics) <= 10 for r in again)
    assert {t for r in again for t in r.topics} == books


def test_a_topic_unwanted_while_in_flight_is_unsubscribed_after_its_ack() -> None:
    core = Subscriptions()
    core.want({"a", "b"})
    (request,) = core.sync(0.0)
    core.want({"b"})
    assert core.sync(0.1) == []  # nothing live to unsubscribe yet, and "b" is in flight
    outcome = core.reply(ack(request), 0.2)
    assert outcome.acked == ("b",)
    assert outcome.sync
    assert [(r.op, r.topics) for r in core.sync(0.3)] == [("unsubscribe", ("a",))]


def test_a_disconnect_forgets_live_and_in_flight_but_keeps_what_is_wanted() -> None:
    core = Subscriptions()
    subscribed(core, {"a"})
    core.want({"a", "b"})
    core.sync(1.0)
    core.disconnect()
    assert core.live == set()
    assert core.in_flight == {}
    assert [r.topics for r in core.sync(2.0)] == [("a", "b")]


def test_expired_names_requests_unanswered_past_the_deadline() -> None:
    core = Subscriptions(deadline=5.0)
    core.want({"a"})
    (old,) = core.sync(10.0)
    core.want({"a", "b"})
    (recent,) = core.sync(14.0)
    assert core.expired(14.9) == []
    assert core.expired(15.5) == [old]
    core.reply(ack(old), 16.0)
    assert core.expired(19.5) == [recent]


def test_an_unanswered_request_is_sent_again_with_a_doubling_wait_then_given_up() -> None:
    core = Subscriptions(deadline=1.0, resends=2)
    core.want({"a"})
    (sent,) = core.sync(0.0)
    assert core.overdue(0.9).resend == ()
    (again,) = core.overdue(1.1).resend
    assert (again.req_id, again.topics, again.resends) == (sent.req_id, ("a",), 1)
    assert core.overdue(3.0).resend == ()  # the second wait is twice as long
    (third,) = core.overdue(3.2).resend
    assert third.resends == 2 and core.overdue(7.0) == Overdue()
    (given_up,) = core.overdue(7.3).give_up
    assert given_up.req_id == sent.req_id
    assert core.sync(7.3) == []  # still in flight: the shell replaces the connection instead


def test_the_second_reply_to_a_request_sent_twice_settles_nothing_else() -> None:
    core = Subscriptions(deadline=1.0)
    core.want({"a"})
    (sent,) = core.sync(0.0)
    (again,) = core.overdue(1.5).resend
    core.want({"a", "b"})
    (other,) = core.sync(1.6)
    assert core.reply(ack(sent), 1.7).acked == ("a",)
    # Bybit answers the copy too ("already subscribed"): it must not be taken for the reply to `other`.
    assert core.reply(ack(again, success=False, ret_msg="error:already subscribed,topic:a"), 1.8).acked == ()
    assert core.reply(ack(other), 1.9).acked == ("b",)
    assert core.live == {"a", "b"} and core.in_flight == {}


def test_a_disconnect_forgets_requests_being_chased() -> None:
    core = Subscriptions(deadline=1.0)
    core.want({"a"})
    core.sync(0.0)
    core.overdue(1.5)
    core.disconnect()
    assert core.overdue(100.0) == Overdue() and core.resent == set()
    (fresh,) = core.sync(100.0)
    assert fresh.resends == 0


def test_the_shells_references_to_desired_and_live_stay_current() -> None:
    core = Subscriptions()
    desired, live = core.desired, core.live
    subscribed(core, {"a"})
    core.want({"b"})
    assert (desired, live) == ({"b"}, {"a"})


def test_auth_request_is_signed_and_its_reply_read() -> None:
    key, expires, signature = orjson.loads(auth_request("key", "secret", 1_000))["args"]
    assert key == "key" and expires > 1_000  # a margin for clock skew
    assert signature == hmac.new(b"secret", f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    assert auth_reply('{"op":"auth","success":true,"ret_msg":""}') == AuthReply(True)
    assert auth_reply('{"op":"auth","success":false,"ret_msg":"Invalid signature."}') == AuthReply(
        False, "Invalid signature."
    )
    assert auth_reply('{"op":"pong","success":true}') is None
    assert auth_reply("not json") is None
