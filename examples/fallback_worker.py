#!/usr/bin/env python3
"""Usage: python examples/fallback_worker.py --after 60   (all flags: --help)

Falls back to e-mail for notifications nobody saw: consumes notify-bridge's
delivery receipts (routing key `notifications.result`, bridge setting
`receipts.enabled = true`) and "sends an e-mail" (prints a line) for every
user who was offline when a notification arrived and has still not read it
after --after seconds. It learns "read" from the bridge's `read` receipts
(a tab's read / read_all frame, or PATCH /api/me/notifications).

    offline, stored   -> wait --after seconds; a `read` (or a later
                         `delivered`, after a redelivery) cancels the e-mail
    offline, not stored ("store": false, inbox off)
                      -> e-mail at once: there is nothing to read later
    delivered         -> nothing to do

Receipts come at least once (a redelivered message repeats them), so the
worker remembers whom it e-mailed and what was read. It keeps that in
memory only: a real one would keep it in its database.

Needs `pip install -r examples/requirements.txt`. Defaults match
config/dev.toml and scripts/rabbitmq (guest/guest on 127.0.0.1:5672).
"""

import argparse
import json
import os
import sys
import time

import pika
from pika.exceptions import AMQPError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def parse_args():
    parser = argparse.ArgumentParser(description="E-mail users about notifications they did not read.")
    parser.add_argument("--amqp-url", default=os.environ.get("NOTIFY_BRIDGE_AMQP_URL", DEFAULT_AMQP_URL),
                        help="broker URL (default: $NOTIFY_BRIDGE_AMQP_URL or %(default)s)")
    parser.add_argument("--exchange", default="notifications_exchange", help="default: %(default)s")
    parser.add_argument("--routing-key", default="notifications.result",
                        help="the bridge's receipts.routing_key (default: %(default)s)")
    parser.add_argument("--queue", default="notify-bridge.fallback-email",
                        help="this worker's durable queue (default: %(default)s)")
    parser.add_argument("--after", type=float, default=60.0, metavar="SECONDS",
                        help="e-mail when still unread after SECONDS (default: %(default)s)")
    parser.add_argument("--count", type=int, default=0,
                        help="exit after COUNT e-mails (default: run until Ctrl-C)")
    return parser.parse_args()


class Fallback:
    """What is waiting for a read, what was read, and whom we e-mailed."""

    def __init__(self, after):
        self.after = after
        self.waiting = {}  # (id, user_id) -> (deadline, seq)
        self.read = set()
        self.emailed = set()
        self.sent = 0

    def receipt(self, r):
        status, key = r.get("status"), (r.get("id"), r.get("user_id"))
        if key[1] is None:
            return  # a channel, broadcast or invalid receipt: no one to e-mail
        if status in ("read", "delivered"):
            if status == "read":
                self.read.add(key)
            self.waiting.pop(key, None)
        elif status == "offline" and key not in self.read and key not in self.emailed:
            if r.get("stored"):
                self.waiting.setdefault(key, (time.monotonic() + self.after, r.get("seq")))
            else:
                self.email(key, None, "was offline and it was not kept in the inbox")

    def due(self):
        now = time.monotonic()
        for key, (deadline, seq) in sorted(self.waiting.items(), key=lambda kv: kv[1][0]):
            if deadline <= now:
                del self.waiting[key]
                self.email(key, seq, f"still unread after {self.after:g} s")

    def email(self, key, seq, why):
        message_id, user = key
        self.emailed.add(key)
        self.sent += 1
        print(f"e-mail to user {user}: notification {message_id} (seq {seq}) {why}", flush=True)


def main():
    args = parse_args()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    except AMQPError as e:
        sys.exit(f"fallback_worker: cannot connect to {args.amqp_url}: {e!r} (is the broker up? scripts/rabbitmq start)")
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True)
    channel.queue_bind(args.queue, args.exchange, routing_key=args.routing_key)
    fallback = Fallback(args.after)

    def on_receipt(ch, method, _properties, body):
        try:
            fallback.receipt(json.loads(body))
        except ValueError:
            print(f"fallback_worker: not a JSON receipt: {body[:200]!r}", file=sys.stderr)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(args.queue, on_receipt)
    print(f"fallback_worker: waiting for receipts on {args.queue} "
          f"({args.exchange} / {args.routing_key}), e-mail after {args.after:g} s", file=sys.stderr, flush=True)
    try:
        while not args.count or fallback.sent < args.count:
            connection.process_data_events(time_limit=0.2)
            fallback.due()
    except KeyboardInterrupt:
        print("fallback_worker: stopped", file=sys.stderr)
    finally:
        if connection.is_open:
            connection.close()


if __name__ == "__main__":
    main()
