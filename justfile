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

# Start a broker on the default endpoints
broker:
    cargo run --release -p broker

# Start an echo worker on the default backend
worker *args:
    cargo run --release -p broker --bin worker -- {{args}}

# Send requests through the default frontend
client *args:
    cargo run --release -p broker --bin client -- {{args}}

# Broker throughput and latency next to a direct echo (release build)
bench:
    cargo build --release --workspace --bins
    ./target/release/lab-bench

# The test suite, as CI runs it
test:
    cargo test --workspace
