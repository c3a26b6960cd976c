"""A stock libzmq PUB (pyzmq) sending weather updates in the documented format.

Usage: weather_pub.py ENDPOINT ID ZIP. Connects to the proxy's XSUB and sends
`[ZIP]["ID INSTANCE SEQ TEMPERATURE HUMIDITY"]` with SEQ 1, 2, 3... about 500 times a second
until killed. Prints `ready` once connected.
"""
import random
import sys
import time

import zmq

endpoint, name, zip_code = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = zmq.Context()
pub = ctx.socket(zmq.PUB)
pub.setsockopt(zmq.LINGER, 0)
pub.connect(endpoint)
instance = random.getrandbits(48)
print("ready", flush=True)
seq = 0
while True:
    seq += 1
    body = f"{name} {instance:x} {seq} {random.randrange(-80, 135)} {random.randrange(10, 60)}"
    pub.send_multipart([zip_code.encode(), body.encode()])
    time.sleep(0.002)
