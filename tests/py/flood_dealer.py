"""A stock libzmq DEALER (pyzmq) that sends requests and never reads a reply.

Usage: flood_dealer.py ENDPOINT N SIZE. Sends N requests `[""][id][SIZE bytes]` through the
broker's frontend, prints `ready sent=N` once all are queued, and then sleeps without reading
until killed: the broker's queue of replies toward it fills up.
"""
import sys
import time

import zmq

endpoint, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ctx = zmq.Context()
dealer = ctx.socket(zmq.DEALER)
dealer.setsockopt(zmq.LINGER, 0)
dealer.setsockopt(zmq.RCVHWM, 1)
dealer.connect(endpoint)
payload = b"x" * size
for i in range(count):
    dealer.send_multipart([b"", str(i).encode(), payload])
print(f"ready sent={count}", flush=True)
while True:
    time.sleep(60)
