"""The ZeroMQ Guide's Paranoid Pirate worker (ppworker, RFC 6) in pyzmq, without its simulated
crashes and overloads: an echo worker.

Usage: ppworker.py ENDPOINT. As the Guide's: a DEALER with a random identity, READY on each new
socket, a HEARTBEAT every second; the queue taken for dead after 3 silent seconds, and then
(after a pause of 1 s, doubling up to 32 s) the socket closed and a new one opened, with a new
identity and a new READY. Nothing else is ever re-sent: when the broker restarts, libzmq
reconnects the socket underneath and flushes the heartbeats queued meanwhile, and that is all
the new broker hears from this worker until its liveness runs out. Prints `ready` once at start,
and `reconnecting` on stderr each time it opens a new socket; runs until killed.
"""
import random
import sys
import time

import zmq

HEARTBEAT_LIVENESS = 3
HEARTBEAT_INTERVAL = 1.0
INTERVAL_INIT = 1.0
INTERVAL_MAX = 32.0
PPP_READY, PPP_HEARTBEAT = b"\x01", b"\x02"

endpoint = sys.argv[1]
context = zmq.Context()
poller = zmq.Poller()


def worker_socket():
    worker = context.socket(zmq.DEALER)
    identity = b"%04X-%04X" % (random.randint(0, 0x10000), random.randint(0, 0x10000))
    worker.setsockopt(zmq.IDENTITY, identity)
    poller.register(worker, zmq.POLLIN)
    worker.connect(endpoint)
    worker.send(PPP_READY)
    return worker


worker = worker_socket()
print("ready", flush=True)
liveness = HEARTBEAT_LIVENESS
interval = INTERVAL_INIT
heartbeat_at = time.time() + HEARTBEAT_INTERVAL
while True:
    socks = dict(poller.poll(int(HEARTBEAT_INTERVAL * 1000)))
    if socks.get(worker) == zmq.POLLIN:
        frames = worker.recv_multipart()
        if len(frames) >= 3 and frames[1] == b"":
            worker.send_multipart(frames)
            liveness = HEARTBEAT_LIVENESS
        elif len(frames) == 1 and frames[0] == PPP_HEARTBEAT:
            liveness = HEARTBEAT_LIVENESS
        else:
            print(f"E: invalid message {frames!r}", file=sys.stderr, flush=True)
        interval = INTERVAL_INIT
    else:
        liveness -= 1
        if liveness == 0:
            print(f"W: heartbeat failure, reconnecting in {interval:.2f} s", file=sys.stderr, flush=True)
            time.sleep(interval)
            if interval < INTERVAL_MAX:
                interval *= 2
            poller.unregister(worker)
            worker.setsockopt(zmq.LINGER, 0)
            worker.close()
            worker = worker_socket()
            print("reconnecting", file=sys.stderr, flush=True)
            liveness = HEARTBEAT_LIVENESS
    if time.time() > heartbeat_at:
        heartbeat_at = time.time() + HEARTBEAT_INTERVAL
        worker.send(PPP_HEARTBEAT)
