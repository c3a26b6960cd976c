//! The soak's faults: what can be broken, and the record of each one made.

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) enum Fault {
    KillBroker,
    HangBroker,
    KillWorker(usize),
    HangWorker(usize),
    PartitionQueue,
    KillPipelineWorker(usize),
    HangPipelineWorker(usize),
    PartitionPipeline,
    KillProxy,
    HangProxy,
    HangSubscriber(usize),
    PartitionPubsub(Side),
}

impl Fault {
    pub(super) fn kind(self) -> &'static str {
        match self {
            Fault::KillBroker => "kill-broker",
            Fault::HangBroker => "hang-broker",
            Fault::KillWorker(_) => "kill-worker",
            Fault::HangWorker(_) => "hang-worker",
            Fault::PartitionQueue => "partition-queue",
            Fault::KillPipelineWorker(_) => "kill-pipeline-worker",
            Fault::HangPipelineWorker(_) => "hang-pipeline-worker",
            Fault::PartitionPipeline => "partition-pipeline",
            Fault::KillProxy => "kill-proxy",
            Fault::HangProxy => "hang-proxy",
            Fault::HangSubscriber(_) => "hang-subscriber",
            Fault::PartitionPubsub(_) => "partition-pubsub",
        }
    }

    /// A random fault and how long it lasts (a killed process stays down that long).
    pub(super) fn pick(rng: &mut StdRng) -> (Self, Duration) {
        // Workers 2 and 3 may be killed; worker 1 of each kind only hangs (see the module doc).
        let killable = |rng: &mut StdRng, n: usize| rng.gen_range(1..n);
        let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.gen_range(lo..=hi));
        match rng.gen_range(0..12) {
            0 => (Fault::KillBroker, ms(rng, 300, 2000)),
            // Hangs of the broker and the proxy stay below their 10 s watchdog.
            1 => (Fault::HangBroker, ms(rng, 1000, 4000)),
            2 => (
                Fault::KillWorker(killable(rng, SQ_WORKERS)),
                ms(rng, 300, 2000),
            ),
            3 => (
                Fault::HangWorker(rng.gen_range(0..SQ_WORKERS)),
                ms(rng, 1000, 6000),
            ),
            4 => (Fault::PartitionQueue, ms(rng, 1000, 6000)),
            5 => (
                Fault::KillPipelineWorker(killable(rng, PIPE_WORKERS)),
                ms(rng, 300, 2000),
            ),
            6 => (
                Fault::HangPipelineWorker(rng.gen_range(0..PIPE_WORKERS)),
                ms(rng, 1000, 6000),
            ),
            7 => (Fault::PartitionPipeline, ms(rng, 1000, 6000)),
            8 => (Fault::KillProxy, ms(rng, 300, 2000)),
            9 => (Fault::HangProxy, ms(rng, 1000, 4000)),
            10 => (
                Fault::HangSubscriber(rng.gen_range(0..SUBSCRIBERS.len())),
                ms(rng, 1000, 5000),
            ),
            _ => {
                let side = [Side::Both, Side::Publishers, Side::Subscribers][rng.gen_range(0..3)];
                (Fault::PartitionPubsub(side), ms(rng, 1000, 6000))
            }
        }
    }
}

#[derive(Debug, Serialize)]
pub(super) struct FaultRecord {
    pub(super) at_s: f64,
    pub(super) kind: &'static str,
    pub(super) target: String,
    pub(super) held_ms: u64,
}
