//! Seed, "Proxy", experiments 1-5, plus a late joiner, a stalled subscriber and a proxy pair
//! that loses one proxy for good.
//!
//! Every scenario runs the real `proxy`, `publisher` and `subscriber` binaries. Publishers
//! report what they sent per zip; subscribers what they received, the gaps they can prove from
//! the sequence numbers, and their longest silence. Recovery time is that silence minus the
//! outage the scenario made.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use pubsub::{PublisherSummary, SubscriberSummary};
use tokio::time::Instant;

use super::{Lab, PartitionMode, Scenario};
use crate::netns::{self, TestHost};
use crate::process::Proc;
use crate::relay::Relay;
use crate::verdict::Verdict;
use nix::sys::signal::Signal;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario { name: "many-pubsub", about: "proxy seed 1: three publishers, three subscribers, everyone gets all they asked for", run: |l| Box::pin(many_pubsub(l)) },
        Scenario { name: "weather", about: "proxy seed 2: a weather publisher of ten zips, averages per zip", run: |l| Box::pin(weather(l)) },
        Scenario { name: "zip-filter", about: "proxy seed 3: subscribers receive only the zips they subscribed to", run: |l| Box::pin(zip_filter(l)) },
        Scenario { name: "proxy-restart", about: "proxy seed 4: proxy killed (SIGKILL) and restarted; publishers and subscribers resume by themselves", run: |l| Box::pin(proxy_restart(l)) },
        Scenario { name: "pubsub-partition", about: "proxy seed 5: partition between the proxy and both sides, then healed", run: |l| Box::pin(partition(l)) },
        Scenario { name: "pubsub-partition-restart", about: "a partition during which the proxy is killed and restarted, then healed", run: |l| Box::pin(partition_restart(l)) },
        Scenario { name: "pubsub-partition-publishers", about: "partition between the proxy and its publishers only (relay), then healed", run: |l| Box::pin(partition_publishers(l)) },
        Scenario { name: "pubsub-partition-subscribers", about: "partition between the proxy and its subscribers only (relay), then healed", run: |l| Box::pin(partition_subscribers(l)) },
        Scenario { name: "proxy-failover", about: "a proxy pair: one proxy SIGKILLed and never restarted; subscribers of both miss nothing and deliver each update once", run: |l| Box::pin(proxy_failover(l)) },
        Scenario { name: "late-joiner", about: "a subscriber joining late gets the last value of each zip at once (last value cache)", run: |l| Box::pin(late_joiner(l)) },
        Scenario { name: "stalled-subscriber", about: "a subscriber stopped (SIGSTOP) does not stall the others nor the proxy's intake", run: |l| Box::pin(stalled_subscriber(l)) },
    ]
}

const READY_WITHIN: Duration = Duration::from_secs(20);
const EXIT_WITHIN: Duration = Duration::from_secs(120);
const LOOPBACK: &str = "tcp://127.0.0.1:0";

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Where publishers and subscribers run relative to the proxy.
enum Net {
    Local,
    /// On a test host in a network namespace.
    Netns(TestHost),
    /// Through relays (to the XSUB, to the XPUB).
    Relay(Relay, Relay),
}

/// Which links a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Both,
    Publishers,
    Subscribers,
}

/// What to build a topology on.
enum Setup {
    Local,
    Netns(TestHost),
    Relay,
}

impl Net {
    fn mode(&self) -> &'static str {
        match self {
            Net::Local => "processes",
            Net::Netns(_) => "netns",
            Net::Relay(..) => "relay",
        }
    }

    /// Cuts or heals the links of `side` (in a namespace both sides share one link).
    async fn set_partitioned(&self, side: Side, partitioned: bool) -> Result<()> {
        match self {
            Net::Netns(host) => host.set_partitioned(partitioned).await,
            Net::Relay(to_xsub, to_xpub) => {
                if side != Side::Subscribers {
                    to_xsub.set_partitioned(partitioned);
                }
                if side != Side::Publishers {
                    to_xpub.set_partitioned(partitioned);
                }
                Ok(())
            }
            Net::Local => Ok(()),
        }
    }
}

/// A proxy, and the endpoints its peers use.
struct Topology {
    lab: Lab,
    logs: PathBuf,
    net: Net,
    proxy: Proc,
    xsub: String,
    xpub: String,
    /// Where publishers and subscribers connect (the relays' in relay mode).
    pub_endpoint: String,
    sub_endpoint: String,
}

async fn start_proxy(
    lab: &Lab,
    logs: &Path,
    name: &str,
    xsub: &str,
    xpub: &str,
    extra: &[&str],
) -> Result<(Proc, String, String)> {
    let mut args = strings(&["--xsub", xsub, "--xpub", xpub]);
    args.extend(strings(extra));
    let mut proxy = Proc::spawn(name, &lab.bins.path("proxy"), &args, logs)?;
    let ready = proxy.ready(READY_WITHIN).await?;
    let xsub = ready
        .get("xsub")
        .cloned()
        .context("ready line has no xsub")?;
    let xpub = ready
        .get("xpub")
        .cloned()
        .context("ready line has no xpub")?;
    Ok((proxy, xsub, xpub))
}

impl Topology {
    async fn start(lab: &Lab, scenario: &str, setup: Setup, extra: &[&str]) -> Result<Self> {
        lab.bins.check(&["proxy", "publisher", "subscriber"])?;
        let logs = lab.logs_for(scenario);
        let host = match &setup {
            Setup::Netns(h) => format!("tcp://{}:0", h.host_ip),
            _ => LOOPBACK.to_string(),
        };
        let (proxy, xsub, xpub) = start_proxy(lab, &logs, "proxy", &host, &host, extra).await?;
        let (net, pub_endpoint, sub_endpoint) = match setup {
            Setup::Relay => {
                let a = Relay::start(common::endpoint::resolve(&xsub)?)
                    .await?
                    .labelled("publishers'");
                let b = Relay::start(common::endpoint::resolve(&xpub)?)
                    .await?
                    .labelled("subscribers'");
                let (pe, se) = (a.endpoint(), b.endpoint());
                (Net::Relay(a, b), pe, se)
            }
            Setup::Netns(h) => (Net::Netns(h), xsub.clone(), xpub.clone()),
            Setup::Local => (Net::Local, xsub.clone(), xpub.clone()),
        };
        Ok(Self {
            lab: lab.clone(),
            logs,
            net,
            proxy,
            xsub,
            xpub,
            pub_endpoint,
            sub_endpoint,
        })
    }

    fn spawn(&self, name: &str, bin: &str, args: &[String]) -> Result<Proc> {
        let program = self.lab.bins.path(bin);
        match &self.net {
            Net::Netns(host) => {
                Proc::spawn_with(name, host.command(&program).args(args), &self.logs)
            }
            _ => Proc::spawn(name, &program, args, &self.logs),
        }
    }

    /// A subscriber with a JSON summary, once it hears the proxy (subscriptions in place).
    async fn subscriber(&self, name: &str, zips: &str, extra: &[&str]) -> Result<Proc> {
        let mut args = strings(&["--connect", &self.sub_endpoint, "--zip", zips, "--json"]);
        args.extend(strings(extra));
        let mut sub = self.spawn(name, "subscriber", &args)?;
        sub.ready(READY_WITHIN).await?;
        Ok(sub)
    }

    /// A publisher with a JSON summary, once connected (and subscribed to).
    async fn publisher(&self, name: &str, extra: &[&str]) -> Result<Proc> {
        let mut args = strings(&[
            "--connect",
            &self.pub_endpoint,
            "--id",
            name,
            "--json",
            "--wait-subscriber-ms",
            "10000",
        ]);
        args.extend(strings(extra));
        let mut publisher = self.spawn(name, "publisher", &args)?;
        publisher.ready(READY_WITHIN).await?;
        Ok(publisher)
    }

    /// Kills the proxy and starts a new one on the same endpoints; returns the outage.
    async fn restart_proxy(&mut self, down_for: Duration) -> Result<Duration> {
        self.proxy.kill().await?;
        let killed = Instant::now();
        tokio::time::sleep(down_for).await;
        let (proxy, _, _) = start_proxy(
            &self.lab,
            &self.logs,
            "proxy-2",
            &self.xsub,
            &self.xpub,
            &[],
        )
        .await?;
        self.proxy = proxy;
        Ok(killed.elapsed())
    }
}

async fn finish<T: serde::de::DeserializeOwned>(proc: &mut Proc) -> Result<T> {
    let status = proc.wait(EXIT_WITHIN).await?;
    anyhow::ensure!(
        status.success(),
        "{} failed\n{}",
        proc.name,
        proc.log_tail()
    );
    proc.json().with_context(|| proc.log_tail())
}

async fn stop<T: serde::de::DeserializeOwned>(proc: &mut Proc) -> Result<T> {
    proc.signal(Signal::SIGTERM)?;
    finish(proc).await
}

/// Updates sent for `zip` by all `publishers`.
fn sent_for(publishers: &[PublisherSummary], zip: &str) -> u64 {
    publishers
        .iter()
        .map(|p| p.by_zip.get(zip).copied().unwrap_or(0))
        .sum()
}

/// The expectations about one subscriber: it received exactly what was sent for its zips from
/// its first update of each stream on, minus what it proves it missed; its streams reach the
/// publishers' last numbers; and (unless a fault was made) it missed nothing.
fn judge_subscriber(
    v: &mut Verdict,
    name: &str,
    s: &SubscriberSummary,
    zips: &[&str],
    publishers: &[PublisherSummary],
    lossless: bool,
) {
    let sent: u64 = zips.iter().map(|z| sent_for(publishers, z)).sum();
    // Updates published before a stream's first one reached the subscriber (a slow joiner's
    // start) are neither received nor gaps.
    let before_first: u64 = s.streams.iter().map(|st| st.first.saturating_sub(1)).sum();
    v.timeline(name, &s.timeline)
        .figure(&format!("{name}_sent"), sent)
        .figure(&format!("{name}_received"), s.received)
        .figure(&format!("{name}_gaps"), s.gaps)
        .figure(&format!("{name}_duplicates"), s.duplicates);
    if before_first > 0 {
        v.figure(&format!("{name}_before_first"), before_first);
    }
    let got: Vec<&str> = s.by_zip.keys().map(String::as_str).collect();
    v.expect(
        got.iter().all(|z| zips.contains(z)),
        format!("{name} gets only {zips:?}, got {got:?}"),
    );
    v.expect(
        s.received + s.gaps + before_first == sent,
        format!(
            "{name}: received {} + gaps {} + before its first {before_first} = sent {sent}",
            s.received, s.gaps
        ),
    );
    for st in &s.streams {
        let last = publishers
            .iter()
            .find(|p| p.id == st.publisher)
            .and_then(|p| p.by_zip.get(&st.zip).copied());
        v.expect(
            Some(st.last) == last,
            format!("{name} got the last update of {} {}", st.publisher, st.zip),
        );
    }
    if lossless {
        v.expect(
            s.gaps == 0 && s.received == sent,
            format!("{name} missed nothing"),
        );
    }
    v.expect(
        before_first * 100 <= sent,
        format!("{name} missed at most 1% at its start, missed {before_first}"),
    );
}

/// Waits for every publisher to finish, lets the last updates arrive, then stops every
/// subscriber: their summaries, in order.
async fn collect(
    publishers: &mut [Proc],
    subscribers: &mut [Proc],
) -> Result<(Vec<PublisherSummary>, Vec<SubscriberSummary>)> {
    let mut sent = Vec::new();
    for p in publishers {
        sent.push(finish::<PublisherSummary>(p).await?);
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let mut got = Vec::new();
    for s in subscribers {
        got.push(stop::<SubscriberSummary>(s).await?);
    }
    Ok((sent, got))
}

fn sum_sent(publishers: &[PublisherSummary]) -> u64 {
    publishers.iter().map(|p| p.sent).sum()
}

async fn many_pubsub(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "many-pubsub", Setup::Local, &[]).await?;
    let plan = [
        ("s1", "10001"),
        ("s2", "10002,10003"),
        ("s3", "10001,10004"),
    ];
    let mut subs = Vec::new();
    for (name, zips) in plan {
        subs.push(topo.subscriber(name, zips, &[]).await?);
    }
    let mut pubs = Vec::new();
    for name in ["p1", "p2", "p3"] {
        let flags = [
            "--zip-range",
            "10000-10004",
            "--rate",
            "1000",
            "--count",
            "3000",
        ];
        pubs.push(topo.publisher(name, &flags).await?);
    }
    let (sent, got) = collect(&mut pubs, &mut subs).await?;
    let mut v = Verdict::new("many-pubsub", topo.net.mode());
    v.figure("sent", sum_sent(&sent));
    for ((name, zips), s) in plan.iter().zip(&got) {
        let zips: Vec<&str> = zips.split(',').collect();
        judge_subscriber(&mut v, name, s, &zips, &sent, true);
    }
    Ok(v)
}

async fn weather(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "weather", Setup::Local, &[]).await?;
    let zips: Vec<String> = (10000..10010).map(|z| z.to_string()).collect();
    let zips: Vec<&str> = zips.iter().map(String::as_str).collect();
    let sub = topo.subscriber("s1", &zips.join(","), &[]).await?;
    let flags = [
        "--zip-range",
        "10000-10009",
        "--rate",
        "2000",
        "--count",
        "10000",
    ];
    let p = topo.publisher("p1", &flags).await?;
    let (sent, got) = collect(&mut [p], &mut [sub]).await?;
    let s = &got[0];
    let mut v = Verdict::new("weather", topo.net.mode());
    v.figure("sent", sum_sent(&sent));
    judge_subscriber(&mut v, "s1", s, &zips, &sent, true);
    let averages: BTreeMap<&str, f64> = s
        .by_zip
        .iter()
        .map(|(z, a)| (z.as_str(), (a.avg_temperature * 10.0).round() / 10.0))
        .collect();
    v.figure("avg_temperature", serde_json::to_value(&averages)?);
    v.expect(s.by_zip.len() == 10, "an average for each of the ten zips");
    v.expect(
        s.by_zip
            .values()
            .all(|a| (-80.0..135.0).contains(&a.avg_temperature)),
        "averages within the publisher's range",
    );
    Ok(v)
}

async fn zip_filter(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "zip-filter", Setup::Local, &[]).await?;
    let a = topo.subscriber("s1", "10001", &[]).await?;
    let b = topo.subscriber("s2", "10002", &[]).await?;
    let flags = [
        "--zip-range",
        "10000-10009",
        "--rate",
        "2000",
        "--count",
        "6000",
    ];
    let p = topo.publisher("p1", &flags).await?;
    let (sent, got) = collect(&mut [p], &mut [a, b]).await?;
    let (a, b) = (&got[0], &got[1]);
    let mut v = Verdict::new("zip-filter", topo.net.mode());
    v.figure("sent", sum_sent(&sent));
    judge_subscriber(&mut v, "s1", a, &["10001"], &sent, true);
    judge_subscriber(&mut v, "s2", b, &["10002"], &sent, true);
    v.expect(
        a.received + b.received < sum_sent(&sent) / 4,
        "the other eight zips were filtered out",
    );
    Ok(v)
}

/// Recovery: the subscriber's longest silence minus the outage; a silence shorter than the
/// outage means the fault missed the flow.
fn judge_recovery(v: &mut Verdict, subs: &[&SubscriberSummary], outage: Duration, limit_ms: u64) {
    let outage_ms = outage.as_millis() as u64;
    let silence = subs.iter().map(|s| s.longest_silence_ms).max().unwrap_or(0);
    let recovery = silence.saturating_sub(outage_ms);
    v.figure("outage_ms", outage_ms)
        .figure("longest_silence_ms", silence)
        .figure("recovery_ms", recovery)
        .figure("reconnects", subs.iter().map(|s| s.reconnects).sum::<u64>());
    // The last update before a cut may arrive a moment after it: a few ms of slack.
    v.expect(
        silence + 250 >= outage_ms,
        "the fault interrupted a live flow",
    );
    v.expect(
        recovery <= limit_ms,
        format!("updates flow again within {limit_ms} ms of the fault's end, took {recovery} ms"),
    );
}

async fn proxy_restart(lab: &Lab) -> Result<Verdict> {
    let mut topo = Topology::start(lab, "proxy-restart", Setup::Local, &[]).await?;
    let mut s1 = topo.subscriber("s1", "10001,10002", &[]).await?;
    let mut s2 = topo.subscriber("s2", "10002", &[]).await?;
    let flags = ["--zips", "10001,10002", "--rate", "400", "--count", "3200"];
    let mut p = topo.publisher("p1", &flags).await?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let down_for = lab.outage.unwrap_or(Duration::from_millis(1500));
    let outage = topo.restart_proxy(down_for).await?;
    let sent = vec![finish::<PublisherSummary>(&mut p).await?];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let a: SubscriberSummary = stop(&mut s1).await?;
    let b: SubscriberSummary = stop(&mut s2).await?;
    let mut v = Verdict::new("proxy-restart", topo.net.mode());
    v.figure("sent", sum_sent(&sent))
        .figure("unsent", sent[0].unsent)
        .figure("publisher_reconnects", sent[0].reconnects);
    judge_subscriber(&mut v, "s1", &a, &["10001", "10002"], &sent, false);
    judge_subscriber(&mut v, "s2", &b, &["10002"], &sent, false);
    judge_recovery(&mut v, &[&a, &b], outage, 2000);
    v.expect(sent[0].reconnects >= 1, "the publisher reconnected");
    Ok(v)
}

/// A proxy pair (issue 20): two proxies, publishers and subscribers given both. Proxy `a` is
/// SIGKILLed a quarter of the way through and never restarted: through `b` the subscribers
/// miss nothing, and deliver each update once (the copies through the other proxy dropped,
/// counted `redundant`).
async fn proxy_failover(lab: &Lab) -> Result<Verdict> {
    lab.bins.check(&["proxy", "publisher", "subscriber"])?;
    let logs = lab.logs_for("proxy-failover");
    let (mut proxy_a, xsub_a, xpub_a) =
        start_proxy(lab, &logs, "proxy-a", LOOPBACK, LOOPBACK, &[]).await?;
    let (mut proxy_b, xsub_b, xpub_b) =
        start_proxy(lab, &logs, "proxy-b", LOOPBACK, LOOPBACK, &[]).await?;
    let xsubs = format!("{xsub_a},{xsub_b}");
    let xpubs = format!("{xpub_a},{xpub_b}");
    let subscriber = |name: &str, zips: &str| -> Result<Proc> {
        let args = strings(&["--connect", &xpubs, "--zip", zips, "--json"]);
        Proc::spawn(name, &lab.bins.path("subscriber"), &args, &logs)
    };
    let mut s1 = subscriber("s1", "10001,10002")?;
    s1.ready(READY_WITHIN).await?;
    let mut s2 = subscriber("s2", "10002")?;
    s2.ready(READY_WITHIN).await?;
    let args = strings(&[
        "--connect",
        &xsubs,
        "--id",
        "p1",
        "--json",
        "--wait-subscriber-ms",
        "10000",
        "--zips",
        "10001,10002",
        "--rate",
        "400",
        "--count",
        "3200",
    ]);
    let mut p = Proc::spawn("p1", &lab.bins.path("publisher"), &args, &logs)?;
    p.ready(READY_WITHIN).await?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    proxy_a.kill().await?;
    let sent = vec![finish::<PublisherSummary>(&mut p).await?];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let a: SubscriberSummary = stop(&mut s1).await?;
    let b: SubscriberSummary = stop(&mut s2).await?;
    let mut v = Verdict::new("proxy-failover", "processes");
    v.figure("sent", sum_sent(&sent))
        .figure("unsent", sent[0].unsent)
        .figure(
            "unsent_by_proxy",
            serde_json::to_value(&sent[0].unsent_by_proxy)?,
        );
    v.expect(
        sent[0].unsent == 0,
        "the publisher sent every update to a live proxy",
    );
    for (name, s, zips) in [
        ("s1", &a, &["10001", "10002"][..]),
        ("s2", &b, &["10002"][..]),
    ] {
        judge_subscriber(&mut v, name, s, zips, &sent, true);
        v.figure(&format!("{name}_redundant"), s.redundant);
        v.expect(
            s.duplicates == 0 && s.late == 0,
            format!(
                "{name} delivered each update once ({} duplicates, {} late)",
                s.duplicates, s.late
            ),
        );
        v.expect(
            s.redundant > 0,
            format!("{name} dropped the other proxy's copies"),
        );
        for (proxy, label) in s.by_proxy.iter().zip(["proxy-a", "proxy-b"]) {
            // The picture: s1's first copies by proxy, beside each subscriber's deliveries.
            if name == "s1" {
                v.timeline(&format!("s1 first via {label}"), &proxy.timeline);
            }
            v.figure(&format!("{name}_first_via_{label}"), proxy.first);
        }
        v.expect(
            s.by_proxy
                .get(1)
                .is_some_and(|x| x.first > 0 && x.reconnects == 0),
            format!("{name}: proxy-b brought updates first and its link held"),
        );
    }
    // Nothing stops: the recovery is the subscribers' longest silence, the kill included.
    let silence = a.longest_silence_ms.max(b.longest_silence_ms);
    v.figure("recovery_ms", silence)
        .figure("longest_silence_ms", silence);
    v.expect(
        silence <= 500,
        format!("no silence over 500 ms across the kill, the longest {silence} ms"),
    );
    let _ = proxy_b.signal(Signal::SIGTERM);
    let _ = proxy_b.wait(EXIT_WITHIN).await;
    Ok(v)
}

async fn partition(lab: &Lab) -> Result<Verdict> {
    partitioned("pubsub-partition", lab, false, Side::Both).await
}

async fn partition_restart(lab: &Lab) -> Result<Verdict> {
    partitioned("pubsub-partition-restart", lab, true, Side::Both).await
}

async fn partition_publishers(lab: &Lab) -> Result<Verdict> {
    partitioned("pubsub-partition-publishers", lab, false, Side::Publishers).await
}

async fn partition_subscribers(lab: &Lab) -> Result<Verdict> {
    partitioned(
        "pubsub-partition-subscribers",
        lab,
        false,
        Side::Subscribers,
    )
    .await
}

/// Cuts publishers and subscribers off the proxy for the outage (restarting the proxy
/// meanwhile if `restart`), heals, and judges the recovery.
async fn partitioned(name: &str, lab: &Lab, restart: bool, side: Side) -> Result<Verdict> {
    let use_netns = side == Side::Both
        && match lab.partition {
            PartitionMode::Netns => true,
            PartitionMode::Relay => false,
            PartitionMode::Auto => netns::available().await,
        };
    let setup = if use_netns {
        Setup::Netns(
            // A host number per scenario: a namespace deleted just before may linger a moment.
            TestHost::create(if restart { 2 } else { 1 })
                .await
                .context("cannot create the test host (needs root and iproute2)")?,
        )
    } else {
        Setup::Relay
    };
    let mut topo = Topology::start(lab, name, setup, &[]).await?;
    let mut s1 = topo.subscriber("s1", "10001,10002", &[]).await?;
    let cut = lab.outage.unwrap_or(Duration::from_millis(4500));
    let count = ((cut.as_secs_f64() + 8.0) * 400.0) as u64;
    let flags = [
        "--zips",
        "10001,10002",
        "--rate",
        "400",
        "--count",
        &count.to_string(),
    ];
    let mut p = topo.publisher("p1", &flags).await?;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    topo.net.set_partitioned(side, true).await?;
    let started = Instant::now();
    if restart {
        tokio::time::sleep(cut / 3).await;
        topo.restart_proxy(Duration::from_millis(500)).await?;
        tokio::time::sleep_until(started + cut).await;
    } else {
        tokio::time::sleep(cut).await;
    }
    topo.net.set_partitioned(side, false).await?;
    let outage = started.elapsed();
    let sent = vec![finish::<PublisherSummary>(&mut p).await?];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let a: SubscriberSummary = stop(&mut s1).await?;
    let mut v = Verdict::new(name, topo.net.mode());
    v.figure("sent", sum_sent(&sent))
        .figure("publisher_reconnects", sent[0].reconnects);
    judge_subscriber(&mut v, "s1", &a, &["10001", "10002"], &sent, false);
    judge_recovery(&mut v, &[&a], outage, 2000);
    Ok(v)
}

async fn late_joiner(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(lab, "late-joiner", Setup::Local, &[]).await?;
    let zips = "10000,10001,10002,10003,10004";
    let mut early = topo.subscriber("early", zips, &[]).await?;
    // Each zip updated every 2.5 s: without the cache a newcomer waits that long for some.
    let mut p = topo
        .publisher(
            "p1",
            &["--zip-range", "10000-10004", "--rate", "2", "--count", "30"],
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(6000)).await;
    let mut late = topo.subscriber("late", zips, &["--count", "5"]).await?;
    let joined: SubscriberSummary = finish(&mut late).await?;
    let sent = vec![finish::<PublisherSummary>(&mut p).await?];
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let early: SubscriberSummary = stop(&mut early).await?;
    let mut v = Verdict::new("late-joiner", topo.net.mode());
    let first = joined.first_update_ms.unwrap_or(u64::MAX);
    v.figure("late_first_update_ms", first)
        .figure("late_elapsed_ms", joined.elapsed_ms)
        .figure("early_received", early.received)
        .figure("early_duplicates", early.duplicates);
    v.expect(
        joined.by_zip.len() == 5,
        format!(
            "the late joiner has every zip, has {:?}",
            joined.by_zip.keys()
        ),
    );
    v.expect(
        joined.elapsed_ms < 1500,
        format!(
            "all five last values within 1.5 s of joining (the publisher needs 2.5 s), took {} ms",
            joined.elapsed_ms
        ),
    );
    judge_subscriber(
        &mut v,
        "early",
        &early,
        &zips.split(',').collect::<Vec<_>>(),
        &sent,
        true,
    );
    v.expect(
        early.duplicates == 0,
        format!(
            "the last values went to the newcomer alone, none to the early subscriber (it counted {} duplicates)",
            early.duplicates
        ),
    );
    Ok(v)
}

async fn stalled_subscriber(lab: &Lab) -> Result<Verdict> {
    let topo = Topology::start(
        lab,
        "stalled-subscriber",
        Setup::Local,
        &["--json", "--stats-secs", "1", "--stall-timeout-ms", "2000"],
    )
    .await?;
    let mut healthy = topo.subscriber("healthy", "10001", &[]).await?;
    let mut stalled = topo.subscriber("stalled", "10001", &[]).await?;
    // About 1.75 MB/s of updates: the stopped subscriber's socket buffers fill in seconds.
    let mut p = topo
        .publisher(
            "p1",
            &["--zips", "10001", "--rate", "50000", "--count", "750000"],
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stalled.signal(Signal::SIGSTOP)?;
    let stopped = Instant::now();
    let sent = vec![finish::<PublisherSummary>(&mut p).await?];
    let stopped_for = stopped.elapsed();
    stalled.signal(Signal::SIGCONT)?;
    // Time to drain what its buffers hold, see the closed connection and reconnect: 1.5 s
    // was too short once on a busy CI machine (215,880 updates to read first).
    tokio::time::sleep(Duration::from_millis(5000)).await;
    let h: SubscriberSummary = stop(&mut healthy).await?;
    let st: SubscriberSummary = stop(&mut stalled).await?;
    let stats: Vec<pubsub::ProxyStats> = topo
        .proxy
        .stdout()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ins: Vec<u64> = stats
        .iter()
        .map(|s| s.messages_in)
        .filter(|&n| n > 0 && n < sent[0].sent)
        .collect();
    let last = stats.last().cloned().unwrap_or_default();
    let mut v = Verdict::new("stalled-subscriber", topo.net.mode());
    // The flow the fault hits first: its timeline shows the stop and the cut.
    v.timeline("stalled", &st.timeline);
    v.figure("sent", sent[0].sent)
        .figure("stopped_ms", stopped_for.as_millis() as u64)
        .figure("healthy_longest_silence_ms", h.longest_silence_ms)
        .figure("proxy_slow_dropped", last.slow_dropped)
        .figure("proxy_peer_errors", last.peer_errors)
        .figure("proxy_stalled_cut", last.stalled_cut)
        .figure("stalled_received", st.received)
        .figure("stalled_reconnects", st.reconnects);
    judge_subscriber(&mut v, "healthy", &h, &["10001"], &sent, false);
    v.expect(
        ins.windows(2).all(|w| w[1] > w[0]),
        format!("the proxy's intake never stopped: {ins:?}"),
    );
    v.expect(
        h.longest_silence_ms < 2000,
        format!(
            "the healthy subscriber was not held until the stopped one was cut (stall timeout 2000 ms), waited {} ms",
            h.longest_silence_ms
        ),
    );
    v.expect(
        last.stalled_cut + last.peer_errors >= 1 && st.reconnects >= 1,
        "the stalled subscriber was cut",
    );
    Ok(v)
}
