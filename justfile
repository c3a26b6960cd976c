# Demo scenarios and roles. Every recipe is one plain command, also shown in the README: `just`
# is a shortcut, never the only way. `just` alone lists the recipes.

# List the recipes
default:
    @just --list --unsorted

# The tour: every scenario of every pattern, narrated, then a summary table and target/lab-report/index.html
tour:
    cargo run --release -p lab

# List the scenarios
list:
    cargo run --release -p lab -- --list

# --- Shared queue scenarios (crates/broker) ---

# Seed shared queue 1: one client, one worker
one-worker:
    cargo run --release -p lab -- one-worker

# Seed shared queue 2: a second worker shares the load
two-workers:
    cargo run --release -p lab -- two-workers

# Seed shared queue 3: kill the broker (SIGKILL) and restart it
broker-restart:
    cargo run --release -p lab -- broker-restart

# Seed shared queue 4: network partition (mode: auto, netns or relay)
partition mode="auto":
    cargo run --release -p lab -- --partition {{mode}} partition

# A worker killed (SIGKILL) mid-request: another answers it
worker-crash:
    cargo run --release -p lab -- worker-crash

# A worker hung (SIGSTOP) holding a request: purged, another answers it
worker-hang:
    cargo run --release -p lab -- worker-hang

# A broker pair: the primary SIGKILLed for good, the backup takes over (docs/pairs.md)
broker-failover:
    cargo run --release -p lab -- broker-failover

# A broker pair: the primary cut off from everyone, then healed (mode: auto, netns or relay)
broker-failover-partition mode="auto":
    cargo run --release -p lab -- --partition {{mode}} broker-failover-partition

# --- Divide and conquer scenarios (crates/pipeline) ---

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

# The pipeline master killed (SIGKILL) mid-batch and started again on the same output
pipeline-master-restart:
    cargo run --release -p lab -- pipeline-master-restart

# --- Pub/sub scenarios (crates/pubsub) ---

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

# A proxy pair: one proxy SIGKILLed for good, subscribers of both miss nothing (docs/pairs.md)
proxy-failover:
    cargo run --release -p lab -- proxy-failover

# Seed proxy 5: partition between the proxy and both sides (mode: auto, netns or relay)
pubsub-partition mode="auto":
    cargo run --release -p lab -- --partition {{mode}} pubsub-partition

# A partition during which the proxy is killed and restarted (mode: auto, netns or relay)
pubsub-partition-restart mode="auto":
    cargo run --release -p lab -- --partition {{mode}} pubsub-partition-restart

# A partition between the proxy and its publishers only (relay)
pubsub-partition-publishers:
    cargo run --release -p lab -- pubsub-partition-publishers

# A partition between the proxy and its subscribers only (relay)
pubsub-partition-subscribers:
    cargo run --release -p lab -- pubsub-partition-subscribers

# A late joiner gets the last value of each zip at once
late-joiner:
    cargo run --release -p lab -- late-joiner

# A stopped subscriber (SIGSTOP) does not stall the others
stalled-subscriber:
    cargo run --release -p lab -- stalled-subscriber

# --- zmq_poll scenario (crates/poll) ---

# Seed zmq_poll: a SUB via the proxy and a flooded PULL served by one task, nothing lost or late
poll-scenario:
    cargo run --release -p lab -- poll

# --- Shared queue roles: run each in its own terminal ---

# Broker on the default endpoints (frontend 5559, backend 5560)
broker *args:
    cargo run --release -p broker -- {{args}}

# Echo worker on the default backend (e.g. just worker --id w1 --work-ms 100)
worker *args:
    cargo run --release -p broker --bin worker -- {{args}}

# Client through the default frontend (e.g. just client --requests 1000 --concurrency 8)
client *args:
    cargo run --release -p broker --bin client -- {{args}}

# --- Image pipeline roles ---

# Pipeline master (default: the built-in sample set; binds 5557, 5558, 5561; waits for workers)
pipeline *args:
    cargo run --release -p pipeline -- {{args}}

# Pipeline worker on the default endpoints
pipeline-worker *args:
    cargo run --release -p pipeline --bin pipeline-worker -- {{args}}

# Filter the built-in sample set with two in-process workers, into pipeline-out/
pipeline-demo:
    cargo run --release -p pipeline -- --local-workers 2

# --- Weather pub/sub roles ---

# Pub/sub proxy on the default endpoints (XSUB 5555, XPUB 5556)
proxy *args:
    cargo run --release -p pubsub -- {{args}}

# Weather publisher on the default XSUB (e.g. just publisher --id north --zip-range 10000-10009)
publisher *args:
    cargo run --release -p pubsub --bin publisher -- {{args}}

# Weather subscriber on the default XPUB (e.g. just subscriber --zip 10001)
subscriber *args:
    cargo run --release -p pubsub --bin subscriber -- {{args}}

# --- zmq_poll role ---

# One task serving a SUB, a PULL and a PUSH (self-fed without flags; e.g. just poll --sub tcp://127.0.0.1:5556 --zip 10001)
poll *args:
    cargo run --release -p poll -- {{args}}

# --- Benchmarks and tests ---

# Broker against a direct DEALER<->ROUTER echo (builds the roles first)
bench:
    cargo run --release -p lab --bin lab-bench

# Pipeline against the same filter in-process
pipeline-bench:
    cargo build --release -p pipeline --bins && ./target/release/pipeline-bench

# Pub/sub proxy against libzmq's zmq_proxy and no proxy
pubsub-bench:
    cargo build --release -p pubsub --bins && ./target/release/pubsub-bench

# The test suite, as CI runs it
test:
    cargo test --workspace

# Wire fuzzer: random and mutated ZMTP connections at a live process (lab fuzz --help)
fuzz *args:
    cargo run --release -p lab -- fuzz {{args}}

# Soak: shared queue, pipeline and pub/sub together under random faults (docs/soak.md)
soak minutes="5" seed="1":
    cargo run --release -p lab -- soak --minutes {{minutes}} --seed {{seed}}
