#!/usr/bin/env python3
"""Usage: python examples/publish_amqp.py --user 1 --text hello   (live feed: --every 2 [--count N]; all flags: --help)

Publishes notifications to notify-bridge over AMQP with pika, the way any
backend service would: a JSON body on the exchange `notifications_exchange`
with routing key `notifications.send`, publisher confirms on, so "published"
means the broker has it.

    # one message to user 1
    python examples/publish_amqp.py --user 1 --text hello
    # any JSON payload, to a channel, with an event name
    python examples/publish_amqp.py --channel public:news --event news --payload '{"headline": "hi"}'
    # a live feed: a position every 2 s with "store": false (kept out of the
    # inbox), until Ctrl-C or --count N messages
    python examples/publish_amqp.py --user 1 --every 2

Needs `pip install -r examples/requirements.txt`. Defaults match config/dev.toml
and scripts/rabbitmq (guest/guest on 127.0.0.1:5672).
"""

import argparse
import datetime
import json
import math
import os
import sys
import uuid

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2f"


def parse_args():
    parser = argparse.ArgumentParser(
        description="Publish notifications to notify-bridge over AMQP.")
    parser.add_argument("--amqp-url", default=os.environ.get("NOTIFY_BRIDGE_AMQP_URL", DEFAULT_AMQP_URL),
                        help="broker URL (default: $NOTIFY_BRIDGE_AMQP_URL or %(default)s)")
    parser.add_argument("--exchange", default="notifications_exchange", help="default: %(default)s")
    parser.add_argument("--routing-key", default="notifications.send", help="default: %(default)s")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="send to this user id")
    target.add_argument("--users", help="send to these user ids, comma-separated")
    target.add_argument("--channel", help="send to everyone in this channel")
    target.add_argument("--broadcast", action="store_true", help="send to everyone connected")
    parser.add_argument("--text", default="hello", help='payload {"text": TEXT} (default: %(default)s)')
    parser.add_argument("--payload", help="payload as JSON text (instead of --text)")
    parser.add_argument("--event", help='event name for the frame (bridge default: "notification")')
    parser.add_argument("--id", help="notification id (default: a new UUID)")
    parser.add_argument("--no-store", action="store_true", help='"store": false: keep it out of the inbox')
    parser.add_argument("--every", type=float, metavar="SECONDS",
                        help="live feed: publish a position update every SECONDS (store: false)")
    parser.add_argument("--count", type=int, default=0,
                        help="with --every: stop after COUNT messages (default: until Ctrl-C)")
    args = parser.parse_args()
    if args.payload is not None:
        try:
            args.payload = json.loads(args.payload)
        except ValueError as e:
            parser.error(f"--payload is not JSON: {e}")
    return args


def user_id(text):
    """1 and "1" are the same user to the bridge; send digits as a number."""
    return int(text) if text.isdigit() else text


def message(args, payload, event=None, store=None, message_id=None):
    """The JSON body the bridge expects: exactly one kind of target, a payload."""
    body = {}
    if args.user is not None:
        body["user_id"] = user_id(args.user)
    elif args.users is not None:
        body["user_ids"] = [user_id(u.strip()) for u in args.users.split(",") if u.strip()]
    elif args.channel is not None:
        body["channel"] = args.channel
    else:
        body["broadcast"] = True
    body["payload"] = payload
    if event:
        body["event"] = event
    if message_id:
        body["id"] = message_id
    if store is False:
        body["store"] = False
    return body


def publish(channel, args, body, message_id):
    """Publishes one message and waits for the broker's confirm."""
    channel.basic_publish(
        exchange=args.exchange,
        routing_key=args.routing_key,
        body=json.dumps(body).encode(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=message_id,  # the bridge uses it when the body has no "id"
        ),
        mandatory=True,  # fail loudly when no queue is bound (bridge never ran)
    )
    print(f"published id={message_id}: {json.dumps(body)}", flush=True)


def position(n):
    """A made-up vehicle going round in a circle, for the live feed."""
    angle = n / 10
    return {
        "device": "truck-7",
        "lat": round(52.52 + 0.01 * math.sin(angle), 6),
        "lon": round(13.405 + 0.01 * math.cos(angle), 6),
        "speed_kmh": 30 + n % 20,
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "n": n,
    }


def main():
    args = parse_args()
    try:
        connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    except AMQPError as e:
        sys.exit(f"publish_amqp: cannot connect to {args.amqp_url}: {e!r} (is the broker up? scripts/rabbitmq start)")
    channel = connection.channel()
    channel.confirm_delivery()
    try:
        if args.every is None:
            message_id = args.id or str(uuid.uuid4())
            payload = args.payload if args.payload is not None else {"text": args.text}
            store = False if args.no_store else None
            publish(channel, args, message(args, payload, args.event, store, args.id), message_id)
        else:
            n = 0
            while not args.count or n < args.count:
                if n:
                    connection.sleep(args.every)  # keeps heartbeats going, unlike time.sleep
                n += 1
                # Live data: "store": false keeps every position out of the inbox.
                body = message(args, position(n), args.event or "location", store=False)
                publish(channel, args, body, str(uuid.uuid4()))
    except UnroutableError:
        sys.exit(f"publish_amqp: the broker routed the message to no queue: no bridge queue is bound "
                 f"to {args.exchange!r} with {args.routing_key!r} (start the bridge once: scripts/demo)")
    except NackError:
        sys.exit("publish_amqp: the broker refused (nacked) the message")
    except pika.exceptions.ChannelClosedByBroker as e:
        sys.exit(f"publish_amqp: the broker closed the channel: {e.reply_code} {e.reply_text} "
                 f"(does the exchange {args.exchange!r} exist? the bridge declares it at startup)")
    except KeyboardInterrupt:
        print("publish_amqp: stopped", file=sys.stderr)
    finally:
        if connection.is_open:
            connection.close()


if __name__ == "__main__":
    main()
