"""A stock libzmq DEALER client (pyzmq) sending one poison request and retrying it.

Usage: poison_client.py ENDPOINT RETRIES INTERVAL_S. With routing id `poisoner` (so that every
retry is the same request to the broker: same client, same first body frame), sends
`[""][poison]`, then sends it again every INTERVAL_S, RETRIES times, and waits INTERVAL_S more.
Prints one JSON line, {"sent", "replies"}; exits 0.
"""
import json
import sys
import time

import zmq

endpoint, retries, interval = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.setsockopt(zmq.ROUTING_ID, b"poisoner")
dealer.connect(endpoint)
sent = replies = 0
for attempt in range(retries + 1):
    dealer.send_multipart([b"", b"poison"])
    sent += 1
    until = time.monotonic() + interval
    while (left := until - time.monotonic()) > 0:
        if dealer.poll(int(left * 1000) + 1) & zmq.POLLIN:
            dealer.recv_multipart()
            replies += 1
print(json.dumps({"sent": sent, "replies": replies}), flush=True)
