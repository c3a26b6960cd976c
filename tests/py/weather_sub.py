"""A stock libzmq SUB (pyzmq) subscribed to one zip through the pub/sub proxy.

Usage: weather_sub.py ENDPOINT ZIP COUNT. Receives COUNT updates (10 s without one is a
failure) and prints one JSON line: how many arrived, the topics seen, and how many were not
the zip asked for. Exits 0 when COUNT updates of that zip alone arrived.
"""
import json
import sys

import zmq

endpoint, zip_code, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.LINGER, 0)
sub.setsockopt(zmq.RCVTIMEO, 10000)
sub.connect(endpoint)
sub.setsockopt(zmq.SUBSCRIBE, zip_code.encode())
received, wrong, topics = 0, 0, set()
while received < count:
    try:
        frames = sub.recv_multipart()
    except zmq.Again:
        print("no update for 10 s", file=sys.stderr)
        break
    topic = frames[0].decode(errors="replace")
    topics.add(topic)
    received += 1
    if topic != zip_code or len(frames) != 2:
        wrong += 1
print(json.dumps({"received": received, "wrong": wrong, "topics": sorted(topics)}), flush=True)
sys.exit(0 if received == count and wrong == 0 else 1)
