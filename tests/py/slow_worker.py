"""A stock libzmq DEALER worker (pyzmq, RFC 6) that takes a while over each request, and keeps
its one connection whatever happens.

Usage: slow_worker.py ENDPOINT NAME WORK_S HEARTBEAT_S. Sends READY, a HEARTBEAT every
HEARTBEAT_S, and answers each request WORK_S after it came: the request's frames and NAME as a
last frame (as our workers sign their replies). It never takes the broker for dead and never
opens a new socket, so after a SIGSTOP and SIGCONT its late replies and heartbeats go out on
the connection it had. Prints `ready` once; runs until killed.
"""
import sys
import time

import zmq

READY, HEARTBEAT = b"\x01", b"\x02"
endpoint, name = sys.argv[1], sys.argv[2].encode()
work, heartbeat = float(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context()
worker = ctx.socket(zmq.DEALER)
worker.setsockopt(zmq.LINGER, 0)
worker.connect(endpoint)
worker.send(READY)
print("ready", flush=True)
pending = []  # (due, frames), oldest first
next_heartbeat = time.monotonic() + heartbeat
while True:
    if worker.poll(20) & zmq.POLLIN:
        frames = worker.recv_multipart()
        if len(frames) >= 3 and frames[1] == b"":
            pending.append((time.monotonic() + work, frames + [name]))
    now = time.monotonic()
    while pending and pending[0][0] <= now:
        worker.send_multipart(pending.pop(0)[1])
    if now >= next_heartbeat:
        worker.send(HEARTBEAT)
        next_heartbeat = now + heartbeat
