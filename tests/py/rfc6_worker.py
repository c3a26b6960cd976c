"""A stock libzmq DEALER worker (pyzmq) speaking the Paranoid Pirate Protocol (ZeroMQ RFC 6).

Usage: rfc6_worker.py ENDPOINT. Sends READY, heartbeats every second, echoes every request
body unchanged (so replies carry no worker name), and runs until killed.
"""
import sys
import time

import zmq

READY, HEARTBEAT = b"\x01", b"\x02"
endpoint = sys.argv[1]
ctx = zmq.Context()
worker = ctx.socket(zmq.DEALER)
worker.setsockopt(zmq.LINGER, 0)
worker.connect(endpoint)
worker.send(READY)
print("ready", flush=True)
poller = zmq.Poller()
poller.register(worker, zmq.POLLIN)
next_heartbeat = time.monotonic() + 1.0
while True:
    if dict(poller.poll(100)).get(worker) == zmq.POLLIN:
        frames = worker.recv_multipart()
        if len(frames) == 1 and frames[0] == HEARTBEAT:
            continue
        if len(frames) >= 3 and frames[1] == b"":
            worker.send_multipart(frames)
    if time.monotonic() >= next_heartbeat:
        worker.send(HEARTBEAT)
        next_heartbeat = time.monotonic() + 1.0
