#!/usr/bin/env python3
"""Usage: python examples/send_http.py --user 1 --text hello [--url http://127.0.0.1:8081] [--api-key dev-api-key]

Sends a notification through notify-bridge's HTTP side port,
POST /api/notifications/send, with an API key. Standard library only.

The bridge answers 202 {"status": "queued", "id": ...} once the broker has
confirmed the message; 400 (invalid body), 401 (no or bad key), 413 (too
large) and 503 (broker unavailable: nothing was queued, retry) are errors.

    python examples/send_http.py --user 1 --text hello
    python examples/send_http.py --channel public:news --payload '{"headline": "hi"}' --event news
    NOTIFY_BRIDGE_API_KEY=... python examples/send_http.py --url https://bridge.example.org --users 1,2

Exit code: 0 when queued, 1 otherwise.
"""

import argparse
import json
import os
import sys
import urllib.error
import urllib.request


def parse_args():
    parser = argparse.ArgumentParser(description="Send a notification through the bridge's HTTP API.")
    parser.add_argument("--url", default=os.environ.get("NOTIFY_BRIDGE_HTTP_URL", "http://127.0.0.1:8081"),
                        help="the side port's base URL (default: $NOTIFY_BRIDGE_HTTP_URL or %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("NOTIFY_BRIDGE_API_KEY", "dev-api-key"),
                        help="a key from http.api_keys (default: $NOTIFY_BRIDGE_API_KEY or dev-api-key)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", help="send to this user id")
    target.add_argument("--users", help="send to these user ids, comma-separated")
    target.add_argument("--channel", help="send to everyone in this channel")
    target.add_argument("--broadcast", action="store_true", help="send to everyone connected")
    parser.add_argument("--text", default="hello", help='payload {"text": TEXT} (default: %(default)s)')
    parser.add_argument("--payload", help="payload as JSON text (instead of --text)")
    parser.add_argument("--event", help='event name (bridge default: "notification")')
    parser.add_argument("--id", help="notification id (default: the bridge makes one)")
    parser.add_argument("--no-store", action="store_true", help='"store": false: keep it out of the inbox')
    parser.add_argument("--timeout", type=float, default=15, help="seconds (default: %(default)s)")
    args = parser.parse_args()
    if args.payload is not None:
        try:
            args.payload = json.loads(args.payload)
        except ValueError as e:
            parser.error(f"--payload is not JSON: {e}")
    return args


def user_id(text):
    return int(text) if text.isdigit() else text


def body(args):
    message = {}
    if args.user is not None:
        message["user_id"] = user_id(args.user)
    elif args.users is not None:
        message["user_ids"] = [user_id(u.strip()) for u in args.users.split(",") if u.strip()]
    elif args.channel is not None:
        message["channel"] = args.channel
    else:
        message["broadcast"] = True
    message["payload"] = args.payload if args.payload is not None else {"text": args.text}
    if args.event:
        message["event"] = args.event
    if args.id:
        message["id"] = args.id
    if args.no_store:
        message["store"] = False
    return message


def main():
    args = parse_args()
    url = args.url.rstrip("/") + "/api/notifications/send"
    request = urllib.request.Request(
        url,
        data=json.dumps(body(args)).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {args.api_key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:  # 4xx/5xx: the body says why
        status, text = e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        sys.exit(f"send_http: cannot reach {url}: {e} (is the bridge running? scripts/demo)")
    print(f"HTTP {status} {text}")
    sys.exit(0 if 200 <= status < 300 else 1)


if __name__ == "__main__":
    main()
