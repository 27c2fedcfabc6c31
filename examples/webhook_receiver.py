#!/usr/bin/env python3
"""A loopd webhook receiver, with nothing but Python's standard library.

It checks each request's Standard Webhooks signature, drops repeats (a
delivery may come more than once), prints every event as one JSON line, and,
with --approve, allows every permission prompt through the API.

    WEBHOOK_SECRET=whsec_... python3 webhook_receiver.py --port 9000 \
        [--approve --loopd http://127.0.0.1:8787 --token la_...]
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE = 5 * 60  # seconds a timestamp may be off: replays are refused
seen = set()  # webhook-id values already handled
lock = threading.Lock()  # deliveries arrive side by side


def verify(secret, headers, body):
    """True if the request was signed with `secret` (whsec_...) lately."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    signatures = headers.get("webhook-signature", "")
    if not msg_id or not timestamp.isdigit():
        return False
    if abs(time.time() - int(timestamp)) > TOLERANCE:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    # The header may hold several space-separated `v1,<base64>` signatures.
    return any(
        version == "v1" and hmac.compare_digest(value, expected)
        for version, _, value in (s.partition(",") for s in signatures.split())
    )


def approve(loopd, token, event):
    """Allows a permission prompt, as a person pressing Allow would."""
    data = event["data"]
    url = f"{loopd}/api/v1/loops/{event['loop_id']}/choices/{data['choice_id']}"
    request = urllib.request.Request(
        url,
        data=json.dumps({"allow": True}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10).close()


def handler(args, secret):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            if not verify(secret, self.headers, body):
                self.send_response(401)
                self.end_headers()
                return
            msg_id = self.headers["webhook-id"]
            with lock:
                first = msg_id not in seen
                seen.add(msg_id)
            if first:
                event = json.loads(body)
                with lock:  # one whole line at a time
                    sys.stdout.write(json.dumps({"webhook_id": msg_id, **event}) + "\n")
                    sys.stdout.flush()
                wants_answer = event["type"] == "requires_choice" and event["data"].get("kind") == "permission"
                if args.approve and wants_answer:
                    approve(args.loopd, args.token, event)
            # Answer quickly: loopd waits at most 10 s, then tries again later.
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_):
            pass  # stdout carries the events only

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--approve", action="store_true", help="allow every permission prompt")
    parser.add_argument("--loopd", default="http://127.0.0.1:8787")
    parser.add_argument("--token", default=os.environ.get("LOOPD_TOKEN"))
    args = parser.parse_args()
    secret = os.environ.get("WEBHOOK_SECRET")
    if not secret:
        sys.exit("set WEBHOOK_SECRET to the webhook's secret (whsec_...)")
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler(args, secret))
    print(f"listening on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
