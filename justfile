# Demo scenarios and roles. Every recipe is a plain cargo command you can also type yourself.

# Run every scenario (the README's main command)
all:
    cargo run --release -p lab

# List the scenarios
list:
    cargo run --release -p lab -- --list

# Seed shared queue 1: one client, one worker
one-worker:
    cargo run --release -p lab -- one-worker

# Seed shared queue 2: a second worker shares the load
two-workers:
    cargo run --release -p lab -- two-workers

# Seed shared queue 3: kill the broker (SIGKILL) and restart it
broker-restart:
    cargo run --release -p lab -- broker-restart

# Seed shared queue 4: network partition (netns as root, else a blackholing relay)
partition mode="auto":
    cargo run --release -p lab -- --partition {{mode}} partition

# A worker killed mid-request
worker-crash:
    cargo run --release -p lab -- worker-crash

# Seed divide and conquer: one pipeline worker
pipeline-one-worker:
    cargo run --release -p lab -- pipeline-one-worker

# Seed divide and conquer: one, then two workers (speed-up)
pipeline-workers:
    cargo run --release -p lab -- pipeline-workers

# A pipeline worker killed (SIGKILL) mid-batch
pipeline-worker-crash:
    cargo run --release -p lab -- pipeline-worker-crash

# Corrupt and non-image files in the input
pipeline-corrupt:
    cargo run --release -p lab -- pipeline-corrupt

# Filter the built-in sample set with two in-process workers, into pipeline-out/
pipeline-demo:
    cargo run --release -p pipeline -- --local-workers 2

# Start a pipeline master (default: the built-in sample set; waits for workers)
pipeline *args:
    cargo run --release -p pipeline -- {{args}}

# Start a pipeline worker on the default endpoints
pipeline-worker *args:
    cargo run --release -p pipeline --bin pipeline-worker -- {{args}}

# Start a broker on the default endpoints
broker:
    cargo run --release -p broker

# Start an echo worker on the default backend
worker *args:
    cargo run --release -p broker --bin worker -- {{args}}

# Send requests through the default frontend
client *args:
    cargo run --release -p broker --bin client -- {{args}}

# Broker and pipeline benchmarks next to their ceilings (release build)
bench:
    cargo build --release --workspace --bins
    ./target/release/lab-bench
    ./target/release/pipeline-bench

# The test suite, as CI runs it
test:
    cargo test --workspace

# Seed proxy 1: three publishers and three subscribers through one proxy
many-pubsub:
    cargo run --release -p lab -- many-pubsub

# Seed proxy 2: a weather publisher of ten zips, averages per zip
weather:
    cargo run --release -p lab -- weather

# Seed proxy 3: subscribers receive only their zips
zip-filter:
    cargo run --release -p lab -- zip-filter

# Seed proxy 4: kill the proxy (SIGKILL) and restart it
proxy-restart:
    cargo run --release -p lab -- proxy-restart

# Seed proxy 5: partition between the proxy and both sides (netns as root, else a relay)
pubsub-partition mode="auto":
    cargo run --release -p lab -- --partition {{mode}} pubsub-partition

# A partition during which the proxy is killed and restarted
pubsub-partition-restart mode="auto":
    cargo run --release -p lab -- --partition {{mode}} pubsub-partition-restart

# A partition between the proxy and its publishers only, or its subscribers only (relay)
pubsub-partition-side:
    cargo run --release -p lab -- pubsub-partition-publishers pubsub-partition-subscribers

# A late joiner gets the last value of each zip at once
late-joiner:
    cargo run --release -p lab -- late-joiner

# A stopped subscriber (SIGSTOP) does not stall the others
stalled-subscriber:
    cargo run --release -p lab -- stalled-subscriber

# Start a pub/sub proxy on the default endpoints (XSUB 5555, XPUB 5556)
proxy *args:
    cargo run --release -p pubsub -- {{args}}

# Start a weather publisher on the default XSUB
publisher *args:
    cargo run --release -p pubsub --bin publisher -- {{args}}

# Start a weather subscriber on the default XPUB
subscriber *args:
    cargo run --release -p pubsub --bin subscriber -- {{args}}

# Pub/sub benchmark: our proxy against libzmq's zmq_proxy and no proxy (release build)
pubsub-bench:
    cargo build --release -p pubsub
    ./target/release/pubsub-bench

# Wire fuzzer: random and mutated ZMTP connections at a guarded live process (lab fuzz --help)
fuzz *args:
    cargo run --release -p lab -- fuzz {{args}}

# Soak: shared queue, pipeline and pub/sub together under random faults (docs/soak.md)
soak minutes="5" seed="1":
    cargo run --release -p lab -- soak --minutes {{minutes}} --seed {{seed}}
