//! Rogue peers of the master: raw zmq.rs sockets on a thread of their own, playing a worker that
//! lies in its reports (a hoarder, a ghost, a liar). They speak the protocol of
//! `docs/pipeline.md` exactly; only what they claim is false.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use pipeline::protocol::{Event, Report, Task};
use zeromq::{PullSocket, PushSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// What a rogue does with a task it receives (it accepts every one).
#[derive(Debug, Clone)]
pub enum Answer {
    /// Never finishes it (a hoarder).
    Hoard,
    /// Reports `done` at once without writing anything (path mode: a liar).
    DoneWithoutOutput,
    /// Reports `done` at once with these bytes as the output (inline).
    DoneInline(Bytes),
    /// Never reads its task PULL at all (connected, so PUSH deals to it).
    Unread,
}

/// A rogue worker.
#[derive(Debug, Clone)]
pub struct Rogue {
    pub id: String,
    /// `slots` in every report.
    pub slots: u32,
    /// `free` in every report, whatever it holds.
    pub free: u32,
    /// Connects a task PULL (a ghost has none: it only reports).
    pub takes_tasks: bool,
    pub answer: Answer,
    /// Right after hello, `done` for these ids of this batch, held or not.
    pub ghost_done: Option<(String, Range<u64>)>,
}

/// What a rogue received.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub tasks: u64,
    pub ids: BTreeSet<u64>,
    pub reports: u64,
}

/// A rogue at work; stopped (sockets closed) on drop.
#[derive(Debug)]
pub struct Running {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Rogue {
    /// Connects to the master's `tasks,results[,control]` endpoints and plays the part.
    pub fn start(self, connect: &str) -> Running {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let eps: Vec<String> = connect.split(',').map(str::to_string).collect();
        let (stop2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(self.play(eps, stop2, seen2));
        });
        Running {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    fn report(&self, event: Event) -> ZmqMessage {
        self.report_with(event, None)
    }

    fn report_with(&self, event: Event, image: Option<Bytes>) -> ZmqMessage {
        Report {
            worker: self.id.clone(),
            slots: self.slots,
            free: self.free,
            heartbeat_ms: 250,
            event,
        }
        .to_message(image)
    }

    async fn play(self, eps: Vec<String>, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
        let mut push = PushSocket::new();
        push.connect(&eps[1]).await.unwrap();
        let mut pull = None;
        if self.takes_tasks {
            let mut p = PullSocket::new();
            p.connect(&eps[0]).await.unwrap();
            pull = Some(p);
        }
        push.send(self.report(Event::Hello)).await.unwrap();
        if let Some((batch, ids)) = &self.ghost_done {
            for id in ids.clone() {
                let done = Event::Done {
                    batch: batch.clone(),
                    id,
                };
                push.send(self.report(done)).await.unwrap();
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        while !stop.load(Ordering::SeqCst) {
            tokio::select! {
                _ = tick.tick() => {
                    let _ = push.send(self.report(Event::Heartbeat)).await;
                }
                msg = recv(&mut pull), if !matches!(self.answer, Answer::Unread) => {
                    let Ok((task, _image)) = Task::from_message(&msg) else { continue };
                    {
                        let mut s = seen.lock().unwrap();
                        s.tasks += 1;
                        s.ids.insert(task.id);
                    }
                    let (batch, id) = (task.batch.clone(), task.id);
                    let _ = push.send(self.report(Event::Accept { batch: batch.clone(), id })).await;
                    let done = Event::Done { batch, id };
                    match &self.answer {
                        Answer::Hoard | Answer::Unread => {}
                        Answer::DoneWithoutOutput => {
                            let _ = push.send(self.report(done)).await;
                        }
                        Answer::DoneInline(bytes) => {
                            let _ = push.send(self.report_with(done, Some(bytes.clone()))).await;
                        }
                    }
                    seen.lock().unwrap().reports += 1;
                }
            }
        }
    }
}

async fn recv(pull: &mut Option<PullSocket>) -> ZmqMessage {
    loop {
        match pull.as_mut() {
            Some(p) => {
                if let Ok(msg) = p.recv().await {
                    return msg;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}
