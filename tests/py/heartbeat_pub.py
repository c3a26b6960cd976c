"""A stock libzmq PUB (pyzmq) with ZMTP heartbeats, sending weather updates for a while.

Usage: heartbeat_pub.py ENDPOINT ID ZIP HEARTBEAT_MS SECONDS. Like weather_pub.py, with
ZMQ_HEARTBEAT_IVL set to HEARTBEAT_MS (libzmq then sends PING commands that often and drops the
connection if nothing comes back within 3 intervals). Sends about 500 updates a second for
SECONDS, then prints `{"sent": N, "disconnects": D}`, D the times its connection was dropped.
"""
import json
import random
import sys
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

endpoint, name, zip_code = sys.argv[1], sys.argv[2], sys.argv[3]
heartbeat_ms, seconds = int(sys.argv[4]), float(sys.argv[5])
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.setsockopt(zmq.LINGER, 0)
pub.setsockopt(zmq.HEARTBEAT_IVL, heartbeat_ms)
pub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * heartbeat_ms)
monitor = pub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
pub.connect(endpoint)
instance = random.getrandbits(48)
print("ready", flush=True)
seq = 0
end = time.time() + seconds
while time.time() < end:
    seq += 1
    body = f"{name} {instance:x} {seq} {random.randrange(-80, 135)} {random.randrange(10, 60)}"
    pub.send_multipart([zip_code.encode(), body.encode()])
    time.sleep(0.002)
disconnects = 0
while monitor.poll(0):
    recv_monitor_message(monitor)
    disconnects += 1
print(json.dumps({"sent": seq, "disconnects": disconnects}), flush=True)
