"""A stock libzmq REQ client (pyzmq) sending N requests through the broker's frontend.

Usage: req_client.py ENDPOINT N. Exits 0 when every reply's first frame equals its request.
"""
import sys

import zmq

endpoint, count = sys.argv[1], int(sys.argv[2])
ctx = zmq.Context()
req = ctx.socket(zmq.REQ)
req.setsockopt(zmq.RCVTIMEO, 10000)
req.setsockopt(zmq.LINGER, 0)
req.connect(endpoint)
ok = 0
for i in range(count):
    body = f"libzmq request {i}".encode()
    req.send(body)
    try:
        reply = req.recv_multipart()
    except zmq.Again:
        print(f"request {i}: no reply", file=sys.stderr)
        break
    if reply[0] != body:
        print(f"request {i}: wrong reply {reply!r}", file=sys.stderr)
        break
    ok += 1
print(f'{{"answered": {ok}}}')
sys.exit(0 if ok == count else 1)
