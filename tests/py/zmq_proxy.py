"""libzmq's own proxy (pyzmq's zmq.proxy runs zmq_proxy in C): the benchmark's baseline.

Usage: zmq_proxy.py. Binds an XSUB and an XPUB on free loopback ports, prints
`ready xsub=<endpoint> xpub=<endpoint>`, and forwards until killed.
"""
import zmq

ctx = zmq.Context()
xsub = ctx.socket(zmq.XSUB)
xsub.bind("tcp://127.0.0.1:*")
xpub = ctx.socket(zmq.XPUB)
xpub.bind("tcp://127.0.0.1:*")
endpoints = [s.getsockopt(zmq.LAST_ENDPOINT).decode() for s in (xsub, xpub)]
print(f"ready xsub={endpoints[0]} xpub={endpoints[1]}", flush=True)
zmq.proxy(xsub, xpub)
