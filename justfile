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
