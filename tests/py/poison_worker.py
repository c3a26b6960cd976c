"""A stock libzmq DEALER worker (pyzmq, RFC 6) that dies on a poison request.

Usage: poison_worker.py ENDPOINT. Sends READY, heartbeats every second and echoes requests
like rfc6_worker.py; a request whose first body frame starts with `poison` makes it die the way
a crashing process does: its socket is closed at once (LINGER 0, the request unanswered), and
it prints `died N`. 0.2 s later it comes back as a new worker would: a new socket, a new
connection, READY. Prints `ready` once at start; runs until killed.
"""
import sys
import time

import zmq

READY, HEARTBEAT = b"\x01", b"\x02"
endpoint = sys.argv[1]
ctx = zmq.Context()


def start():
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(endpoint)
    worker.send(READY)
    return worker


worker = start()
print("ready", flush=True)
deaths = 0
next_heartbeat = time.monotonic() + 1.0
while True:
    if worker.poll(100) & zmq.POLLIN:
        frames = worker.recv_multipart()
        if len(frames) >= 3 and frames[1] == b"":
            if frames[2].startswith(b"poison"):
                worker.close(linger=0)
                deaths += 1
                print(f"died {deaths}", flush=True)
                time.sleep(0.2)
                worker = start()
                next_heartbeat = time.monotonic() + 1.0
                continue
            worker.send_multipart(frames)
    if time.monotonic() >= next_heartbeat:
        worker.send(HEARTBEAT)
        next_heartbeat = time.monotonic() + 1.0
