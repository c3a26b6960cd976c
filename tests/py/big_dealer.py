"""A stock libzmq DEALER (pyzmq) sending one request at the frontend's limits, then waiting
for its reply.

Usage: big_dealer.py ENDPOINT bytes SIZE | big_dealer.py ENDPOINT frames COUNT [TIMEOUT_S].
`bytes`: `[""][SIZE bytes]`, one body frame of SIZE bytes (the envelope, the empty delimiter,
adds nothing to the message's size). `frames`: `[""][f0]...[fCOUNT-1]`, COUNT body frames, so
COUNT + 1 frames in all. Prints one JSON line, {"answered", "echo", "frames", "bytes"}, and exits
0 if the reply came within TIMEOUT_S (default 30) and echoes the request.
"""
import json
import sys

import zmq

endpoint, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
timeout_s = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
if mode == "bytes":
    body = [b"B" * n]
elif mode == "frames":
    body = [f"f{i}".encode() for i in range(n)]
else:
    sys.exit(f"unknown mode {mode}")
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
dealer.connect(endpoint)
dealer.send_multipart([b""] + body)
try:
    reply = dealer.recv_multipart()
except zmq.Again:
    reply = None
if reply is None:
    print(json.dumps({"answered": False, "echo": False, "frames": 0, "bytes": 0}), flush=True)
    sys.exit(1)
# Our workers add their name as a last frame.
echo = reply[0] == b"" and reply[1 : 1 + len(body)] == body
size = sum(len(f) for f in reply)
print(json.dumps({"answered": True, "echo": echo, "frames": len(reply), "bytes": size}), flush=True)
sys.exit(0 if echo else 1)
