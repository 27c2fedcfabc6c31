#!/usr/bin/env python3
"""A small loopd bot: send a message, print the reply as it streams, answer
permission prompts and questions from the terminal, and pick the stream up
again with Last-Event-ID if the connection drops.

    pip install httpx
    export LOOPD_URL=http://127.0.0.1:8787 LOOPD_TOKEN=la_...
    python3 examples/bot.py "Create hello.txt saying hi"
    python3 examples/bot.py --loop loop_... "And now delete it"
"""

import argparse
import json
import os
import sys
import time
import uuid

import httpx


def sse(response):
    """Yields (event, id, data) from a server-sent event stream."""
    name, seq, data = None, None, []
    for line in response.iter_lines():
        if line == "":
            if name and name != "ping":
                yield name, seq, json.loads("\n".join(data) or "{}")
            name, seq, data = None, None, []
        elif line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("id: "):
            seq = int(line[len("id: "):])
        elif line.startswith("data: "):
            data.append(line[len("data: "):])


def answer(client, loop_id, event):
    """Asks the person at the terminal, then answers the choice."""
    payload = event["payload"]
    if event["kind"] == "permission":
        print(f"\n[{payload['tool']}] wants to run: {payload.get('input_summary')}", flush=True)
        allow = input("Allow? [y/N] ").strip().lower().startswith("y")
        body = {"allow": allow}
    else:
        answers = {}
        for q in payload["questions"]:
            print(f"\n{q['question']}")
            for i, option in enumerate(q["options"], 1):
                print(f"  {i}. {option['label']}")
            picked = input("Your choice (numbers, comma-separated): ")
            labels = [q["options"][int(n) - 1]["label"] for n in picked.split(",") if n.strip()]
            answers[q["question"]] = labels if q["multi_select"] else labels[0]
        body = {"answers": answers}
    r = client.post(f"/api/v1/loops/{loop_id}/choices/{event['choice_id']}", json=body)
    r.raise_for_status()


def handle(client, loop_id, name, data):
    """Shows one event; returns an exit code when the turn is over."""
    if name == "queued":
        print(f"(queued, position {data['position']})", file=sys.stderr)
    elif name == "assistant_delta":
        print(data["text"], end="", flush=True)
    elif name == "tool_call":
        print(f"\n[{data['tool']}] {data.get('input_summary') or ''}", flush=True)
    elif name == "requires_choice":
        answer(client, loop_id, data)
    elif name == "done":
        print()
        return 0
    elif name == "interrupted":
        print("\n(interrupted)")
        return 130
    elif name == "error":
        print(f"\nerror {data['code']}: {data['message']}", file=sys.stderr)
        return 1
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message")
    parser.add_argument("--url", default=os.environ.get("LOOPD_URL", "http://127.0.0.1:8787"))
    parser.add_argument("--token", default=os.environ.get("LOOPD_TOKEN"))
    parser.add_argument("--loop", help="an existing loop id (default: create one)")
    parser.add_argument("--drop-after", type=int, help="for testing: drop the first stream after N events")
    args = parser.parse_args()
    if not args.token:
        sys.exit("set LOOPD_TOKEN or pass --token (create one in the web settings or with `loopd token create`)")

    timeout = httpx.Timeout(10.0, read=None)  # streams stay open as long as the turn runs
    client = httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {args.token}"}, timeout=timeout)
    loop_id = args.loop or client.post("/api/v1/loops", json={"title": "bot.py"}).json()["id"]
    print(f"(loop {loop_id})", file=sys.stderr)

    turn_id, last_seq, seen = None, None, 0
    # An Idempotency-Key makes a retried POST safe: it never sends twice.
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    body = {"content": args.message}
    try:
        with client.stream("POST", f"/api/v1/loops/{loop_id}/messages", json=body, headers=headers) as r:
            if r.status_code != 200:
                sys.exit(f"loopd said {r.status_code}: {r.read().decode()}")
            for name, seq, data in sse(r):
                turn_id = data.get("turn_id", turn_id)
                last_seq = seq or last_seq
                code = handle(client, loop_id, name, data)
                if code is not None:
                    return code
                seen += 1
                if args.drop_after and seen >= args.drop_after:
                    break
    except httpx.TransportError as e:
        print(f"\n(connection lost: {e})", file=sys.stderr)

    # The stream dropped before the turn ended: follow the loop from the
    # last event we saw; the server replays what we missed, then goes live.
    while True:
        print(f"\n(reconnecting after event {last_seq})", file=sys.stderr)
        try:
            resume = {"Last-Event-ID": str(last_seq)} if last_seq else {}
            with client.stream("GET", f"/api/v1/loops/{loop_id}/events", headers=resume) as r:
                r.raise_for_status()
                for name, seq, data in sse(r):
                    last_seq = seq or last_seq
                    if data.get("turn_id") != turn_id:
                        continue
                    code = handle(client, loop_id, name, data)
                    if code is not None:
                        return code
        except httpx.TransportError as e:
            print(f"(connection lost: {e})", file=sys.stderr)
            time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
