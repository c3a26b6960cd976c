"""A stock libzmq publisher's side (pyzmq XPUB) connected to the pub/sub proxy's XSUB, which
publishes nothing and reports the subscription messages it receives.

Usage: xpub_listener.py ENDPOINT [--summary]. Prints `ready listener=xpub` once connected, then
one JSON line per subscription message, `{"t_ms": unix ms, "kind": "subscribe"|"unsubscribe",
"prefix": ...}`; with `--summary`, instead, every 200 ms that something changed, `{"held": the
prefixes subscribed now, "messages": subscription messages so far}`. Other messages (the
proxy's heartbeats) are skipped. Runs until killed.
"""
import json
import sys
import time

import zmq

endpoint = sys.argv[1]
summary = "--summary" in sys.argv[2:]
ctx = zmq.Context()
xpub = ctx.socket(zmq.XPUB)
xpub.setsockopt(zmq.LINGER, 0)
# Every subscription message, not only the first of each prefix.
xpub.setsockopt(zmq.XPUB_VERBOSER, 1)
xpub.connect(endpoint)
print("ready listener=xpub", flush=True)
held, messages, shown, last = set(), 0, None, time.time()
while True:
    if xpub.poll(200):
        msg = xpub.recv()
        kind = {b"\x01": "subscribe", b"\x00": "unsubscribe"}.get(msg[:1])
        if kind is not None:
            messages += 1
            prefix = msg[1:]
            if kind == "subscribe":
                held.add(prefix)
            else:
                held.discard(prefix)
            if not summary:
                line = {"t_ms": round(time.time() * 1000), "kind": kind, "prefix": prefix.decode(errors="replace")}
                print(json.dumps(line), flush=True)
    if summary and time.time() - last >= 0.2:
        last = time.time()
        if (len(held), messages) != shown:
            shown = (len(held), messages)
            print(json.dumps({"held": len(held), "messages": messages}), flush=True)
