"""A stock libzmq SUB (pyzmq) that checks each publisher's order through the pub/sub proxy.

Usage: order_sub.py ENDPOINT ZIP [ZIP ...]. One SUB subscribed to every ZIP; prints
`ready subs=1` once subscribed (sent, not yet known to have arrived), then receives until
SIGTERM and prints one JSON line.

Each update (`[zip]["<publisher> <instance> <seq> <temperature> <humidity>"]`) belongs to the
stream `"<publisher> <instance> <zip>"`. An update whose `seq` is below the last one shown of its
stream is `older`: a subscriber that shows what it receives would show the publisher going back
in time. One equal to it is `repeated` (a re-sent last value). Anything else is shown and becomes
the stream's last.

The JSON line: `received`, `shown`, `older`, `repeated`, `bad` (not such an update), per stream
`{shown, older, repeated, max_back, last}` (`max_back`: the largest step back seen), and
`samples`: every 100 ms `[unix_ms, {stream: last shown seq}]`, for the test to see when fresh
numbers arrived.
"""
import json
import signal
import sys
import time

import zmq

SAMPLE_MS = 100

endpoint, zips = sys.argv[1], sys.argv[2:]
ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.setsockopt(zmq.LINGER, 0)
sub.connect(endpoint)
for z in zips:
    sub.setsockopt(zmq.SUBSCRIBE, z.encode())
print("ready subs=1", flush=True)

totals = {"received": 0, "shown": 0, "older": 0, "repeated": 0, "bad": 0}
streams = {}
samples = []
stopped = False


def stop(*_):
    global stopped
    stopped = True


signal.signal(signal.SIGTERM, stop)
poller = zmq.Poller()
poller.register(sub, zmq.POLLIN)
next_sample = time.time()
while not stopped:
    now = time.time()
    if now >= next_sample:
        samples.append([round(now * 1000), {k: s["last"] for k, s in streams.items()}])
        next_sample = now + SAMPLE_MS / 1000
    if not poller.poll(timeout=SAMPLE_MS / 2):
        continue
    # Everything ready, without a poll per message.
    while True:
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        totals["received"] += 1
        try:
            zip_code = frames[0].decode()
            publisher, instance, seq = frames[1].decode().split()[:3]
            seq = int(seq)
        except (IndexError, ValueError, UnicodeDecodeError):
            totals["bad"] += 1
            continue
        key = f"{publisher} {instance} {zip_code}"
        s = streams.get(key)
        if s is None:
            s = streams[key] = {"shown": 0, "older": 0, "repeated": 0, "max_back": 0, "last": 0}
        if seq < s["last"]:
            s["older"] += 1
            totals["older"] += 1
            s["max_back"] = max(s["max_back"], s["last"] - seq)
        elif seq == s["last"]:
            s["repeated"] += 1
            totals["repeated"] += 1
        else:
            s["shown"] += 1
            totals["shown"] += 1
            s["last"] = seq
samples.append([round(time.time() * 1000), {k: s["last"] for k, s in streams.items()}])
print(json.dumps({**totals, "streams": streams, "samples": samples}), flush=True)
