//! A scriptable in-memory [`Publisher`] for tests of stores and relays.
//!
//! It stands in for a broker where the test is about the outbox, not the transport: it records
//! what was delivered, in order, and can refuse chosen events or play an outage. Transport
//! tests use a real broker.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::event::{EventId, OutboxMessage};
use crate::publisher::{PublishOutcome, Publisher};

#[derive(Default)]
struct State {
    delivered: Vec<OutboxMessage>,
    calls: u64,
    probes: u64,
    unavailable: bool,
    reject_always: HashSet<EventId>,
    reject_times: HashMap<EventId, u32>,
    offered: HashMap<EventId, Vec<Instant>>,
    delay: Duration,
    stuck: HashSet<crate::PartitionNo>,
    stuck_timeout: Duration,
}

/// Records deliveries; see the module docs. Clones share state.
#[derive(Clone, Default)]
pub struct TestPublisher {
    state: Arc<Mutex<State>>,
}

impl TestPublisher {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// Every message delivered so far, in delivery order (re-sends appear again).
    pub fn delivered(&self) -> Vec<OutboxMessage> {
        self.with(|s| s.delivered.clone())
    }

    pub fn delivered_count(&self) -> usize {
        self.with(|s| s.delivered.len())
    }

    /// How many times `publish` was called.
    pub fn calls(&self) -> u64 {
        self.with(|s| s.calls)
    }

    /// How many times a relay asked whether the broker is back.
    pub fn probes(&self) -> u64 {
        self.with(|s| s.probes)
    }

    /// How many times this event was offered to the publisher (any outcome).
    pub fn offered(&self, id: EventId) -> u32 {
        self.with(|s| s.offered.get(&id).map_or(0, |v| v.len() as u32))
    }

    /// When this event was offered to the publisher, once per attempt or probe.
    pub fn offer_times(&self, id: EventId) -> Vec<Instant> {
        self.with(|s| s.offered.get(&id).cloned().unwrap_or_default())
    }

    /// While set, every message is `Unavailable` (an outage).
    pub fn set_unavailable(&self, down: bool) {
        self.with(|s| s.unavailable = down);
    }

    /// Rejects this event on every attempt.
    pub fn reject_always(&self, id: EventId) {
        self.with(|s| s.reject_always.insert(id));
    }

    /// Rejects this event on its next `times` attempts, then delivers it.
    pub fn reject_times(&self, id: EventId, times: u32) {
        self.with(|s| s.reject_times.insert(id, times));
    }

    /// Accepts this event from now on (undoes `reject_always` / `reject_times`).
    pub fn accept(&self, id: EventId) {
        self.with(|s| {
            s.reject_always.remove(&id);
            s.reject_times.remove(&id);
        });
    }

    /// Messages of these relay partitions time out (`Unavailable` after `timeout`, as a Kafka
    /// partition without a leader does) while every other message is delivered and the probe
    /// answers. An empty set heals them.
    pub fn set_stuck_partitions(
        &self,
        partitions: impl IntoIterator<Item = crate::PartitionNo>,
        timeout: Duration,
    ) {
        self.with(|s| {
            s.stuck = partitions.into_iter().collect();
            s.stuck_timeout = timeout;
        });
    }

    /// Makes every `publish` call take at least this long (a slow broker).
    pub fn set_delay(&self, delay: Duration) {
        self.with(|s| s.delay = delay);
    }
}

#[async_trait]
impl Publisher for TestPublisher {
    async fn publish(&self, batch: &[OutboxMessage]) -> Vec<PublishOutcome> {
        let (mut delay, stuck_timeout) = self.with(|s| {
            let stuck = batch.iter().any(|m| s.stuck.contains(&m.partition));
            (
                s.delay,
                if stuck {
                    s.stuck_timeout
                } else {
                    Duration::ZERO
                },
            )
        });
        // A batch with a stuck message waits for that message's delivery timeout.
        delay = delay.max(stuck_timeout);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.with(|s| {
            s.calls += 1;
            // Like a client-side rejection in a real producer: nothing after a rejected
            // message of the same aggregate leaves the process.
            let mut blocked = HashSet::new();
            batch
                .iter()
                .map(|m| {
                    if blocked.contains(&m.aggregate) {
                        return PublishOutcome::Skipped;
                    }
                    s.offered
                        .entry(m.event_id)
                        .or_default()
                        .push(Instant::now());
                    if s.unavailable {
                        return PublishOutcome::unavailable("test broker is down");
                    }
                    if s.stuck.contains(&m.partition) {
                        return PublishOutcome::unavailable("test broker: delivery timed out");
                    }
                    if s.reject_always.contains(&m.event_id) {
                        blocked.insert(m.aggregate.clone());
                        return PublishOutcome::rejected("test broker rejects this event");
                    }
                    if let Some(n) = s.reject_times.get_mut(&m.event_id) {
                        if *n > 0 {
                            *n -= 1;
                            blocked.insert(m.aggregate.clone());
                            return PublishOutcome::rejected("test broker rejects this attempt");
                        }
                    }
                    s.delivered.push(m.clone());
                    PublishOutcome::Delivered
                })
                .collect()
        })
    }

    async fn probe(&self) -> Result<(), String> {
        self.with(|s| {
            s.probes += 1;
            if s.unavailable {
                Err("test broker is down".into())
            } else {
                Ok(())
            }
        })
    }
}

/// Polls `check` every 20 ms until it holds, or panics naming `what` after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback port nobody listens on right now (for a private server a test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends `sig` (`STOP`, `CONT`, `KILL`, ...) to process `pid`, as a test freezes, thaws or
/// kills a private server.
pub fn signal(pid: &str, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), pid])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Sends `sig` to every process of the process group `pgid` (a server started with
/// `process_group(0)` and whatever it forked), so that a start script's child is not left
/// running when the script is killed.
pub fn signal_group(pgid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args(["-s", sig, "--", &format!("-{pgid}")])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Waits until something listens on the loopback `port`, or panics naming `what` after
/// `limit`.
pub fn wait_listening(port: u16, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `child`, or a process it started, listens on the loopback `port`: `true` then,
/// `false` when `child` exited first (it could not bind: another test's server won the port
/// between [`free_port`] and its start). Unlike [`wait_listening`], it never mistakes another
/// process's listener for this one. Panics naming `what` after `limit`. Linux (`/proc`).
pub fn wait_child_listening(
    child: &mut std::process::Child,
    port: u16,
    limit: Duration,
    what: &str,
) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        let sockets = listening_sockets(port);
        if !sockets.is_empty()
            && process_tree(child.id())
                .iter()
                .any(|pid| owns_any(*pid, &sockets))
        {
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {port} within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The inodes of the sockets listening on `port` (IPv4 and IPv6).
fn listening_sockets(port: u16) -> Vec<String> {
    let wanted = format!(":{port:04X}");
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local address, state (0A = LISTEN), inode
            if f.len() > 9 && f[1].ends_with(&wanted) && f[3] == "0A" {
                out.push(f[9].to_owned());
            }
        }
    }
    out
}

/// `root` and every process below it.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // After the command name in parentheses: state, then the parent's pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse().ok());
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

fn owns_any(pid: u32, inodes: &[String]) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| {
            let l = l.to_string_lossy();
            inodes.iter().any(|i| l == format!("socket:[{i}]"))
        })
    })
}

/// An outbox message as a relay would hand it to a publisher: `payload` for `aggregate`
/// (also the key) on `topic`, with a fresh event id.
pub fn outbox_message(topic: &str, aggregate: &str, payload: &[u8]) -> OutboxMessage {
    let aggregate = crate::AggregateRef::new("a", aggregate).expect("aggregate id");
    OutboxMessage {
        seq: 0,
        event_id: EventId::new(),
        partition: aggregate.partition(),
        key: aggregate.id().to_owned(),
        aggregate,
        event_type: "t.v1".into(),
        topic: crate::Topic::new(topic).expect("topic"),
        headers: Default::default(),
        payload: bytes::Bytes::copy_from_slice(payload),
        attempts: 0,
        age_at_claim: Duration::ZERO,
    }
}

/// A handler for consumer-runner tests: applies a message by recording its event id, fails
/// (retryably, every time) the one whose payload is `fail`, and finds a message without a
/// usable `event_id` poison.
#[derive(Default)]
pub struct ApplyUnlessFail {
    pub applied: Mutex<Vec<String>>,
}

#[async_trait]
impl crate::MessageHandler for ApplyUnlessFail {
    async fn handle(
        &self,
        m: &crate::IncomingMessage,
    ) -> Result<crate::Handled, crate::HandlerError> {
        let id = m.event_id()?;
        if &m.payload[..] == b"fail" {
            return Err(crate::HandlerError::retry("this one always fails"));
        }
        self.applied.lock().unwrap().push(id.to_string());
        Ok(crate::Handled::Processed)
    }
}

/// What a runner parked for [`ApplyUnlessFail`] with two attempts in group `svc`: a poison
/// message (its `event_id` not a UUID), then `failing` (payload `fail`, key `b`), each with
/// its reason, group, key and payload.
pub fn assert_poison_then_exhausted_parked(
    parked: &[crate::IncomingMessage],
    failing: &OutboxMessage,
) {
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked[0].headers["dlq_reason"].contains("not a UUID"));
    assert_eq!(parked[1].headers["event_id"], failing.event_id.to_string());
    assert!(parked[1].headers["dlq_reason"].contains("failed 2 times"));
    assert_eq!(parked[1].headers["dlq_consumer_group"], "svc");
    assert_eq!(parked[1].key.as_deref(), Some("b"));
    assert_eq!(&parked[1].payload[..], b"fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listener_counts_only_when_the_child_holds_it() {
        // This process holds the port; a child that never listens is not taken for it.
        let ours = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = ours.local_addr().unwrap().port();
        assert_eq!(listening_sockets(port).len(), 1);
        let mut sleeper = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_child_listening(&mut sleeper, port, Duration::from_millis(300), "sleep")
        }));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        assert!(
            found.is_err(),
            "another process's listener was taken for the child's"
        );
        assert!(owns_any(std::process::id(), &listening_sockets(port)));
        // A child that exits (as a server that could not bind does) is reported at once.
        let mut quitter = std::process::Command::new("true").spawn().unwrap();
        assert!(!wait_child_listening(
            &mut quitter,
            free_port(),
            Duration::from_secs(5),
            "true"
        ));
    }
}
