"""A stock libzmq DEALER (pyzmq) with a routing id of its own, sending one request.

Usage: named_dealer.py ENDPOINT ID BODY. Sends `[""][BODY]` through the broker's frontend with
ZMQ_ROUTING_ID set to ID, prints `ready` once sent, waits up to 10 s for the reply, then prints
`{"reply": "<first body frame>", "disconnects": N}` (reply null if none came; N the times its
connection was dropped) and exits 0 only if the reply echoes BODY.
"""
import json
import sys

import zmq
from zmq.utils.monitor import recv_monitor_message

endpoint, routing_id, body = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.setsockopt(zmq.ROUTING_ID, routing_id)
dealer.setsockopt(zmq.RCVTIMEO, 10000)
monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
dealer.connect(endpoint)
dealer.send_multipart([b"", body])
print("ready", flush=True)
try:
    reply = dealer.recv_multipart()
    first = reply[1].decode(errors="replace") if len(reply) > 1 else None
except zmq.Again:
    first = None
disconnects = 0
while monitor.poll(0):
    recv_monitor_message(monitor)
    disconnects += 1
print(json.dumps({"reply": first, "disconnects": disconnects}), flush=True)
sys.exit(0 if first == body.decode() else 1)
