"""A stock libzmq PUB (pyzmq) publishing one zip at a fixed rate through the pub/sub proxy.

Usage: stock_pub.py ENDPOINT ZIP RATE SECONDS. Connects to the proxy's XSUB, prints
`ready publisher=stock` once connected (it then waits 0.5 s for the subscriptions the proxy
re-sends on connection), publishes `[ZIP]["stock <n>"]` at RATE updates per second (in bursts
every millisecond) for SECONDS, and prints `{"sent": N}`.
"""
import json
import sys
import time

import zmq

endpoint, zip_code, rate, seconds = sys.argv[1], sys.argv[2].encode(), float(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.setsockopt(zmq.LINGER, 1000)
pub.setsockopt(zmq.SNDHWM, 0)
pub.connect(endpoint)
print("ready publisher=stock", flush=True)
time.sleep(0.5)
sent = 0
start = time.time()
end = start + seconds
while True:
    now = time.time()
    if now >= end:
        break
    due = int((now - start) * rate)
    while sent < due:
        sent += 1
        pub.send_multipart([zip_code, b"stock %d" % sent])
    time.sleep(0.001)
print(json.dumps({"sent": sent}), flush=True)
pub.close()
ctx.term()
