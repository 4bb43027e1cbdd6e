#!/usr/bin/env python3
"""Usage: python examples/listen.py --dev-token-user 1   (or --token "$TOKEN"; --url ws://127.0.0.1:8080/ws; --count N; --help)

Listens on notify-bridge's WebSocket like an app would, and prints each
notification. Reconnects with exponential backoff (0.5 s, 1 s, 2 s, ...,
capped at --max-backoff, with jitter) when the connection drops or the bridge
restarts; stops after a 1008 close (token expired, or closed by an admin) or
a refused handshake (bad token: retrying would not help).

    # a token from the dev-only endpoint (config/dev.toml has http.dev_tokens = true)
    python examples/listen.py --dev-token-user 1
    # a token you minted: notify-bridge --config config/dev.toml token --user 1
    python examples/listen.py --token "$TOKEN" --channel public:news
    # auth.mode = "none" (local development only)
    python examples/listen.py --user-id 1

Each notification goes to stdout (one line: time, event, id, payload JSON;
with --json the frame as received); everything else goes to stderr.
Needs `pip install -r examples/requirements.txt` (websockets).
"""

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import urllib.error
import urllib.parse
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus


def parse_args():
    parser = argparse.ArgumentParser(description="Print notify-bridge notifications as they arrive.")
    parser.add_argument("--url", default=os.environ.get("NOTIFY_BRIDGE_WS_URL", "ws://127.0.0.1:8080/ws"),
                        help="WebSocket URL (default: $NOTIFY_BRIDGE_WS_URL or %(default)s)")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--token", default=os.environ.get("NOTIFY_BRIDGE_TOKEN"),
                     help="a JWT for the user (default: $NOTIFY_BRIDGE_TOKEN)")
    who.add_argument("--dev-token-user", metavar="USER",
                     help="get a token for USER from --http-url's /api/dev/token (http.dev_tokens = true)")
    who.add_argument("--user-id", help='connect as this user (auth.mode = "none" only)')
    parser.add_argument("--http-url", default="http://127.0.0.1:8081",
                        help="side port, for --dev-token-user (default: %(default)s)")
    parser.add_argument("--channel", action="append", default=[], help="join this channel (repeatable)")
    parser.add_argument("--count", type=int, default=0, help="exit after COUNT notifications")
    parser.add_argument("--json", action="store_true", help="print each notification frame as received")
    parser.add_argument("--max-backoff", type=float, default=10.0,
                        help="longest wait between reconnects, seconds (default: %(default)s)")
    args = parser.parse_args()
    if not (args.token or args.dev_token_user or args.user_id):
        parser.error("give --token (or $NOTIFY_BRIDGE_TOKEN), --dev-token-user USER, or --user-id USER")
    return args


def log(text):
    print(f"listen: {text}", file=sys.stderr, flush=True)


def dev_token(args):
    """A one-hour token from the bridge's development-only endpoint."""
    query = urllib.parse.urlencode({"user_id": args.dev_token_user})
    url = f"{args.http_url.rstrip('/')}/api/dev/token?{query}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["token"]


def socket_url(args, token):
    query = [("token", token)] if token else [("user_id", args.user_id)]
    query += [("channel", c) for c in args.channel]
    return f"{args.url}{'&' if '?' in args.url else '?'}{urllib.parse.urlencode(query)}"


def show(frame, text, as_json):
    if as_json:
        print(text, flush=True)
        return
    at = datetime.datetime.now().strftime("%H:%M:%S")
    extra = "".join(f" {k}={frame[k]}" for k in ("channel", "seq") if k in frame)
    if frame.get("broadcast"):
        extra += " broadcast"
    payload = json.dumps(frame.get("payload"), ensure_ascii=False)
    print(f"{at} {frame.get('event')} id={frame.get('id')}{extra} {payload}", flush=True)


async def listen(args):
    """Returns the exit code: 0 after --count notifications, 1 when stopped."""
    received = 0
    attempt = 0  # failed tries since the last welcome
    token = args.token
    while True:
        code, reason = None, ""
        try:
            if args.dev_token_user:
                token = dev_token(args)  # a fresh one for every connection
            async with connect(socket_url(args, token), proxy=None, open_timeout=10) as ws:
                async for text in ws:
                    frame = json.loads(text)
                    kind = frame.get("type")
                    if kind == "welcome":
                        attempt = 0
                        log(f"welcome: connection {frame.get('connection_id')}, user {frame.get('user_id')}, "
                            f"channels {frame.get('channels')}")
                    elif kind == "notification":
                        show(frame, text, args.json)
                        received += 1
                        if args.count and received >= args.count:
                            await ws.close()
                            return 0
                    else:
                        log(f"frame: {text}")
                # The loop ends quietly on a normal close (1000, 1001).
                code, reason = ws.close_code, ws.close_reason
        except InvalidStatus as e:
            status = e.response.status_code
            log(f"handshake refused: HTTP {status} {e.response.body.decode(errors='replace')}")
            if status in (400, 401, 403, 404):
                return 1  # the same request would be refused again
        except ConnectionClosed as e:
            code, reason = (e.rcvd.code, e.rcvd.reason) if e.rcvd else (1006, "no close frame")
        except (OSError, InvalidHandshake, asyncio.TimeoutError) as e:
            log(f"cannot connect to {args.url}: {e or type(e).__name__}")
        except (urllib.error.URLError, KeyError, ValueError) as e:
            log(f"cannot get a development token from {args.http_url}: {e}")
        if code is not None:
            log(f"closed: {code} {reason}".rstrip())
            if code == 1008:
                log("closed by policy (token expired, or an admin): not reconnecting")
                return 1
        # Exponential backoff with jitter, so that many clients do not all
        # come back in the same second after a bridge restart.
        delay = min(args.max_backoff, 0.5 * 2 ** attempt) * random.uniform(0.75, 1.25)
        delay = min(delay, args.max_backoff)
        attempt += 1
        log(f"reconnecting in {delay:.1f} s (attempt {attempt})")
        await asyncio.sleep(delay)


def main():
    args = parse_args()
    try:
        sys.exit(asyncio.run(listen(args)))
    except KeyboardInterrupt:
        log("stopped")
        sys.exit(130)


if __name__ == "__main__":
    main()
