"""A stock libzmq REQ client (pyzmq) sending N requests through the broker's frontend.

Usage: req_client.py ENDPOINT N [HEARTBEAT_MS]. Exits 0 when every reply's first frame equals
its request. With HEARTBEAT_MS, libzmq sends ZMTP PINGs that often and drops the connection if
nothing comes back within 3 intervals; the client then waits 15 intervals idle halfway, and
reports how many times its connection was dropped (`disconnects`).
"""
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

endpoint, count = sys.argv[1], int(sys.argv[2])
heartbeat_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 0
ctx = zmq.Context()
req = ctx.socket(zmq.REQ)
req.setsockopt(zmq.RCVTIMEO, 10000)
req.setsockopt(zmq.LINGER, 0)
if heartbeat_ms:
    req.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
    req.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
monitor = req.get_monitor_socket(zmq.EVENT_DISCONNECTED)
req.connect(endpoint)
ok = 0
for i in range(count):
    if heartbeat_ms and i == count // 2:
        time.sleep(15 * heartbeat_ms / 1000)
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
disconnects = 0
while monitor.poll(0):
    recv_monitor_message(monitor)
    disconnects += 1
print(f'{{"answered": {ok}, "disconnects": {disconnects}}}')
sys.exit(0 if ok == count else 1)
