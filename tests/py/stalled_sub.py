"""A stock libzmq SUB (pyzmq) that subscribes and never reads: a stalled subscriber.

Usage: stalled_sub.py ENDPOINT ZIP. Small kernel and libzmq receive buffers, so that the
proxy's connection to it fills quickly. Prints `ready` once the subscription is sent, then
sleeps until killed.
"""
import sys
import time

import zmq

endpoint, zip_code = sys.argv[1], sys.argv[2]
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.LINGER, 0)
sub.setsockopt(zmq.RCVHWM, 1)
sub.setsockopt(zmq.RCVBUF, 4096)
sub.connect(endpoint)
sub.setsockopt(zmq.SUBSCRIBE, zip_code.encode())
print("ready", flush=True)
while True:
    time.sleep(60)
