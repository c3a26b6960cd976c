"""A stock libzmq REQ client (pyzmq) sending the same body twice, one after the other.

Usage: req_twice.py ENDPOINT [FIRST_TIMEOUT_S] [SECOND_TIMEOUT_S]. Sends "Hello", waits for
its reply (FIRST_TIMEOUT_S, default 30), then sends "Hello" again at once and waits
SECOND_TIMEOUT_S (default 15). Prints one JSON line per reply, {"n", "worker", "waited"} (the
worker's name is the last frame our workers add), and a last {"answered": N}; exits 0 if both
were answered.
"""
import json
import sys
import time

import zmq

endpoint = sys.argv[1]
timeouts = [float(sys.argv[2]) if len(sys.argv) > 2 else 30.0,
            float(sys.argv[3]) if len(sys.argv) > 3 else 15.0]
ctx = zmq.Context()
req = ctx.socket(zmq.REQ)
req.setsockopt(zmq.LINGER, 0)
req.connect(endpoint)
answered = 0
for n, timeout in enumerate(timeouts, 1):
    req.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sent = time.monotonic()
    req.send(b"Hello")
    try:
        reply = req.recv_multipart()
    except zmq.Again:
        print(f"request {n}: no reply within {timeout} s", file=sys.stderr, flush=True)
        break
    worker = reply[-1].decode(errors="replace") if len(reply) > 1 else None
    print(json.dumps({"n": n, "worker": worker, "waited": time.monotonic() - sent}), flush=True)
    answered += 1
print(json.dumps({"answered": answered}), flush=True)
sys.exit(0 if answered == len(timeouts) else 1)
